"""inference.py: picks the best finished run from MLflow, loads real checkpoints, fails in one line."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import inference
from blueberry import build_model
from blueberry.checkpoint import save_checkpoint
from blueberry.config import load_config
from blueberry.errors import run_cli

pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*")  # MLflow's SQLAlchemy store, not ours
REPO = Path(__file__).resolve().parents[1]
SENTENCES = [
    "Once upon a time there was a little blueberry.",
    "The blueberry lived in a small garden with many friends.",
    "Every day the sun rose over the garden and the birds sang.",
    "Naïve café owners serve crème brûlée — über tasty!",
] * 4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and an OpenMP barrier stalls when other processes share the CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    tok.save(str(path))
    return path


def tiny_run_config(**model):
    m = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=320, seq_len=32, ffn_mult=2)
    m.update(model)
    return load_config(data={"model": m, "tokenizer": {"vocab_size": 300}})


def make_checkpoint(path: Path, tokenizer: Path | None, seed: int = 0, **model) -> Path:
    cfg = tiny_run_config(zero_init_outputs=False, **model)
    torch.manual_seed(seed)
    meta = {"step": 1, "tokens": 100, "train_time_s": 1.0}
    return save_checkpoint(path, build_model(cfg.model), cfg, meta, tokenizer_path=tokenizer)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A local MLflow store with runs the ablation runner would leave behind, plus decoys."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("store")
    tok = train_tokenizer(root / "tokenizer.json")
    ckpt = {name: make_checkpoint(root / "ckpt" / name, tok, seed=i) for i, name in enumerate("abc")}
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    runs = {}

    def add(exp, key, ablation, variant, status, val_bpb, checkpoint, parent=None):
        tags = {
            "ablation": ablation,
            "variant": variant,
            "seed": "0",
            "config_hash": "abc123",
            "status": status,
        }
        if checkpoint is not None:
            tags["checkpoint"] = str(checkpoint)
        if parent is not None:
            tags["mlflow.parentRunId"] = parent
        run = client.create_run(exp, tags=tags)
        for step, bpb in enumerate((val_bpb + 1.0, val_bpb)):  # the final value is the one that counts
            client.log_metric(run.info.run_id, "val_bpb", bpb, step=step)
            client.log_metric(run.info.run_id, "val_loss", bpb * 0.7, step=step)
        client.set_terminated(run.info.run_id)
        runs[key] = run.info.run_id

    e1 = client.create_experiment("qk", artifact_location=str(root / "artifacts"))
    e2 = client.create_experiment("norms", artifact_location=str(root / "artifacts"))
    parent = client.create_run(e1, tags={"ablation": "qk"}).info.run_id
    add(e1, "a", "qk", "on", "finished", 1.5, ckpt["a"], parent)
    add(e2, "b", "norms", "rms", "finished", 1.2, ckpt["b"])  # the best qualifying run, other experiment
    add(e1, "diverged", "qk", "off", "diverged", 0.9, ckpt["c"], parent)
    add(e1, "gone", "qk", "off", "finished", 0.5, root / "deleted-checkpoint", parent)
    return {"root": root, "uri": uri, "runs": runs, "ckpt": ckpt, "tokenizer": tok}


def cli(args, capsys, monkeypatch, cwd):
    """Run inference.main in-process (imports are shared, so it is fast) -> (exit code, stdout, stderr)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: inference.main(args))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def run_subprocess(args, cwd, stdin=None):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"  # see one_thread
    return subprocess.run(
        [sys.executable, str(REPO / "inference.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
    )


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


GEN = ["--json", "--max-new-tokens", "5", "--seed", "0"]


# ---- choosing the run (subprocess: the real entry point, default store in the current directory) --------


def test_no_arguments_pick_the_finished_run_with_the_lowest_val_bpb(store):
    r = run_subprocess(GEN, cwd=store["root"])
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    out = json.loads(line)
    assert out["run"]["run_id"] == store["runs"]["b"]
    assert out["run"]["variant"] == "rms" and out["run"]["val_bpb"] == pytest.approx(1.2)
    assert out["prompt"] == "Once upon a time" and out["tokens"] == len(out["token_ids"]) <= 5
    assert store["runs"]["b"] in r.stderr and "val_bpb 1.2" in r.stderr and "variant rms" in r.stderr


def test_no_store_is_a_one_line_error_and_creates_no_database(tmp_path):
    r = run_subprocess(GEN, cwd=tmp_path)
    assert_one_line_error(r.returncode, r.stderr, "no finished runs with a checkpoint", "--checkpoint DIR")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    "flags,expected",
    [(["--variant", "on"], "a"), (["--ablation", "qk"], "a"), (["--experiment", "norms"], "b")],
)
def test_filters_select_among_qualifying_runs(store, flags, expected, capsys, monkeypatch):
    code, out, err = cli([*GEN, *flags], capsys, monkeypatch, store["root"])
    assert code == 0, err
    assert json.loads(out)["run"]["run_id"] == store["runs"][expected]


def test_run_id_selects_that_run(store, capsys, monkeypatch, tmp_path):
    run_id = store["runs"]["a"]
    code, out, err = cli(
        [*GEN, "--run-id", run_id, "--tracking-uri", store["uri"]], capsys, monkeypatch, tmp_path
    )
    assert code == 0, err
    assert json.loads(out)["run"]["run_id"] == run_id


@pytest.mark.parametrize(
    "flags,needles",
    [
        (["--run-id", "0123456789abcdef0123456789abcdef"], ["no run with id"]),
        (["--run-id", "gone"], ["does not exist"]),  # its checkpoint folder was deleted
        (["--variant", "off"], ["no finished runs with a checkpoint", "variant 'off'"]),  # diverged / gone
        (["--experiment", "nope"], ["no experiment named 'nope'"]),
    ],
)
def test_bad_selection_is_a_one_line_error(store, flags, needles, capsys, monkeypatch):
    flags = [store["runs"].get(f, f) for f in flags]
    code, _, err = cli([*GEN, *flags], capsys, monkeypatch, store["root"])
    assert_one_line_error(code, err, *needles)


# ---- checkpoints ----------------------------------------------------------------------------------------------


def test_checkpoint_flag_needs_no_store_and_is_reproducible(store, capsys, monkeypatch, tmp_path):
    args = [*GEN, "--checkpoint", str(store["ckpt"]["a"]), "--prompts", str(tmp_path / "p.txt")]
    (tmp_path / "p.txt").write_text("Once upon a time\n\nThe blueberry\n")
    code, out, err = cli(args, capsys, monkeypatch, tmp_path)
    assert code == 0, err
    first = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in first] == ["Once upon a time", "The blueberry"]
    assert first[0]["run"]["checkpoint"] == str(store["ckpt"]["a"]) and first[0]["run"]["run_id"] is None
    _, again, _ = cli(args, capsys, monkeypatch, tmp_path)

    def without_timing(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert without_timing(map(json.loads, again.splitlines())) == without_timing(first)
    assert not (tmp_path / "mlflow.db").exists()


def test_streamed_text_is_the_prompt_plus_the_completion(store, capsys, monkeypatch, tmp_path):
    base = ["--checkpoint", str(store["ckpt"]["b"]), *"--max-new-tokens 12 --seed 3 --temperature 1".split()]
    _, out_json, _ = cli([*base, "--json"], capsys, monkeypatch, tmp_path)
    code, streamed, err = cli(base, capsys, monkeypatch, tmp_path)
    assert code == 0, err
    rec = json.loads(out_json)
    assert streamed == rec["prompt"] + rec["completion"] + "\n"
    assert "tokens/s" in err


def test_interactive_reads_prompts_until_an_empty_line(store, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nthe garden\n\nnever read\n"))
    code, out, err = cli(
        [*GEN, "--checkpoint", str(store["ckpt"]["a"]), "--interactive"], capsys, monkeypatch, tmp_path
    )
    assert code == 0, err
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["hello", "the garden"]


def test_corrupt_checkpoint_is_a_one_line_error(store, tmp_path):
    bad = make_checkpoint(tmp_path / "bad", store["tokenizer"])
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-20:] = bytes(b ^ 0xFF for b in data[-20:])
    weights.write_bytes(bytes(data))
    r = run_subprocess([*GEN, "--checkpoint", str(bad)], cwd=tmp_path)
    assert_one_line_error(r.returncode, r.stderr, "corrupt")


def test_missing_checkpoint_or_tokenizer_is_a_one_line_error(store, capsys, monkeypatch, tmp_path):
    code, _, err = cli([*GEN, "--checkpoint", str(tmp_path / "nowhere")], capsys, monkeypatch, tmp_path)
    assert_one_line_error(code, err, "not found")
    no_tok = make_checkpoint(tmp_path / "no-tok", None)
    code, _, err = cli([*GEN, "--checkpoint", str(no_tok)], capsys, monkeypatch, tmp_path)
    assert_one_line_error(code, err, "no tokenizer")


def test_stream_printer_never_prints_half_characters(store):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(store["tokenizer"]))
    text = "Naïve café — über crème"
    out = io.StringIO()
    printer = inference.StreamPrinter(tok, out)
    for token in tok.encode(text).ids:
        printer(token)
        assert "\ufffd" not in out.getvalue()
    printer.finish()
    assert out.getvalue() == text


def test_checkpoint_of_a_plugin_model_loads_in_a_fresh_process(tmp_path, monkeypatch):
    from blueberry.checkpoint import load_model
    from blueberry.registry import MLPS

    (tmp_path / "bb_test_plugin_mlp.py").write_text(
        "import torch.nn as nn\nfrom blueberry import MLPS\n\n"
        "@MLPS.register('bb_test_plugin_mlp')\nclass M(nn.Module):\n"
        "    def __init__(self, d_model, d_ff, bias=False):\n"
        "        super().__init__()\n"
        "        self.w_in = nn.Linear(d_model, d_ff, bias=bias)\n"
        "        self.w_out = nn.Linear(d_ff, d_model, bias=bias)\n\n"
        "    def forward(self, x):\n        return self.w_out(self.w_in(x).relu())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = dict(n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=320, mlp="bb_test_plugin_mlp")
    cfg = load_config(
        data={"plugins": ["bb_test_plugin_mlp"], "model": model, "tokenizer": {"vocab_size": 300}}
    )
    path = save_checkpoint(tmp_path / "ckpt", build_model(cfg.model), cfg, {"step": 1})
    # A fresh process: the plugin is neither imported nor registered.
    monkeypatch.delitem(sys.modules, "bb_test_plugin_mlp")
    monkeypatch.delitem(MLPS._entries, "bb_test_plugin_mlp")
    model, loaded, _, _ = load_model(path)
    assert loaded.model.mlp == "bb_test_plugin_mlp"


# ---- benchmark ---------------------------------------------------------------------------------------------------


def test_benchmark_of_a_random_preset_model_ends_with_one_json_line(tmp_path):
    r = run_subprocess(["--benchmark", "--preset", "tiny", "--new-tokens", "16"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["bench"] == "inference" and rec["model"] == "preset:tiny" and rec["new_tokens"] == 16
    assert rec["decode_tok_s_cache"] > 0 and rec["decode_tok_s_nocache"] > 0 and rec["outputs_match"] is True
    for key in ("ttft_s", "speedup", "peak_mem_mb"):
        assert rec[key] > 0
    assert not (tmp_path / "mlflow.db").exists()
