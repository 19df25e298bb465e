"""Bad input: every broken spec, config or flag ends as ONE line on stderr and exit 2, and leaves nothing behind.

The cases live in tests/fixtures/bad/ (one file each, `cases.yaml` lists the expected messages). "Nothing
behind" means no MLflow store (mlflow.db, mlartifacts), no run folder and no data-cache entry: bad input must
be found before anything is tracked, trained or cached.

"seq_len above the position table": a learned position table always has model.seq_len rows and generation
slides its window, so the table itself cannot be overrun from a spec. What can be is the other fixed-size
table a run depends on, the validation slice: one window needs model.seq_len + 1 tokens, and a spec whose
eval.val_tokens is smaller is refused up front (seq_len_above_val_slice.yaml). The RoPE shape rules (even
head_dim, rope_fraction in (0, 1]) have their own cases.

Safety is here too: YAML is only ever safe-loaded, and `plugins:` imports exactly the listed modules.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from blueberry import ablation
from blueberry.config import ConfigError, load_config
from blueberry.errors import run_cli

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "bad"
CASES = yaml.safe_load((FIXTURES / "cases.yaml").read_text())


def _case_id(case: dict) -> str:
    args = "-".join(re.sub(r"\W+", "_", a).strip("_") for a in case.get("args", []))
    return Path(case["file"]).stem + (f"[{args}]" if args else "")


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def bad_dir(tmp_path, monkeypatch):
    """A copy of the fixture folder as the working directory, an empty cache, no tracking URI in the env."""
    work = tmp_path / "bad"
    shutil.copytree(FIXTURES, work)
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))  # broken_plugin.py is importable, as a plugin next to a spec is
    monkeypatch.setenv("BLUEBERRY_CACHE", str(cache))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")

    def no_training(*args, **kwargs):
        raise AssertionError("bad input reached the trainer")

    monkeypatch.setattr(ablation, "train_fn", no_training)
    return work, cache


def test_the_fixture_covers_every_file_and_enough_cases():
    assert len(CASES) >= 25
    helpers = {"good.yaml", "sweep_good.yaml", "cycle_a.yaml", "cycle_b.yaml", "cases.yaml"}
    named = {c["file"] for c in CASES}
    for spec in FIXTURES.glob("*.yaml"):
        assert spec.name in named | helpers, f"{spec.name} has no case in cases.yaml"
    for c in CASES:
        assert c["expect"] and set(c) <= {"file", "args", "expect"}


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, bad_dir, capsys):
    work, cache = bad_dir
    before = _tree(work)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: ablation.main([case["file"], "--no-progress", *case.get("args", [])]))
    out = capsys.readouterr()
    assert e.value.code == 2, out.err
    assert out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
    assert "Traceback" not in out.err + out.out
    for want in case["expect"]:
        assert want in out.err, f"{want!r} not in {out.err!r}"
    assert _tree(work) == before, "bad input left files behind"
    assert not any(cache.iterdir()), "bad input created a cache entry"


SUBPROCESS_CASES = ["python_tag.yaml", "missing_dataset.yaml", "vocab_mismatch.yaml"]


@pytest.mark.parametrize("file", SUBPROCESS_CASES)
def test_the_script_prints_one_line_and_no_traceback(file, tmp_path):
    """The real `python run_ablation.py`: what the terminal shows is the one line, nothing else."""
    (case,) = [c for c in CASES if c["file"] == file and not c.get("args")]
    work = tmp_path / "bad"
    shutil.copytree(FIXTURES, work)
    (tmp_path / "cache").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(BLUEBERRY_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    before = _tree(work)
    p = subprocess.run(
        [sys.executable, str(REPO / "run_ablation.py"), file, "--no-progress"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert all(want in p.stderr for want in case["expect"]), p.stderr
    assert _tree(work) == before and not any((tmp_path / "cache").iterdir())


# ---------------------------------------------------------------------------------------------------------
# The same mistakes in plain run configs (python -m blueberry.data prepare, inference, the trainer)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("budget: {}\n", "budget: empty"),
        ("preset: tiny\nbudget: null\n", "budget: empty"),
        ("budget: {steps: -1}\n", "budget.steps must be positive"),
        ("model: {n_heads: 4, n_kv_heads: 3, d_model: 64}\n", "n_kv_heads (3) must divide n_heads (4)"),
        ("name: !!python/object/apply:os.system [echo pwned]\n", "malformed YAML"),
    ],
)
def test_run_config_files_give_the_same_one_line_errors(text, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml")
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["c.yaml"]


def test_an_explicit_empty_budget_never_falls_back_to_a_default(tmp_path):
    """RunConfig's default budget (100 steps) stays for configs that say nothing; saying `{}` is an error."""
    assert load_config(data={}).budget.steps == 100
    for over in (["budget={}"], ["budget=null"]):
        with pytest.raises(ConfigError, match="budget: empty"):
            load_config(data={"preset": "tiny"}, overrides=over)


# ---------------------------------------------------------------------------------------------------------
# Safety


def test_yaml_is_only_ever_safe_loaded():
    """No yaml.load / full_load / unsafe loaders anywhere in the package or the CLIs."""
    unsafe = re.compile(
        r"yaml\.(load|load_all|full_load|full_load_all|unsafe_load|unsafe_load_all)\s*\("
        r"|(Unsafe|Full)?Loader\s*=\s*yaml\.(Loader|UnsafeLoader|FullLoader)|yaml\.(Unsafe|Full)Loader\b"
    )
    sources = [*(REPO / "blueberry").rglob("*.py"), *REPO.glob("*.py")]
    assert len(sources) > 10
    for path in sources:
        text = path.read_text()
        assert not unsafe.search(text), f"{path}: unsafe YAML loading"
        if "torch.load(" in text:
            for call in re.findall(r"torch\.load\([^)]*\)", text):
                assert "weights_only=True" in call, f"{path}: {call}"


def test_a_python_tag_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned.txt"
    (tmp_path / "s.yaml").write_text(
        f"name: demo\npreset: !!python/object/apply:os.system ['touch {marker}']\nseeds: [0]\n"
    )
    with pytest.raises(ConfigError, match="malformed YAML.*could not determine a constructor"):
        ablation.load_spec(tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(tmp_path / "s.yaml")
    assert not marker.exists()


def test_plugins_import_exactly_the_listed_modules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "bb_listed_plugin.py").write_text("LOADED = True\n")
    (tmp_path / "bb_unlisted_plugin.py").write_text(
        "from pathlib import Path\nPath('unlisted_ran').write_text('x')\n"
    )
    (tmp_path / "s.yaml").write_text(
        "name: demo\npreset: tiny\nplugins: [bb_listed_plugin]\nseeds: [0]\nbaseline: a\n"
        "variants:\n  a: {}\n  b: {model.qk_norm: false}\n"
    )
    try:
        ablation.load_spec(tmp_path / "s.yaml")
        assert "bb_listed_plugin" in sys.modules
        assert "bb_unlisted_plugin" not in sys.modules and not (tmp_path / "unlisted_ran").exists()
    finally:
        sys.modules.pop("bb_listed_plugin", None)
    for bad in ("os; rm -rf /", "../evil", "a b"):
        (tmp_path / "t.yaml").write_text(f"plugins: [{bad!r}]\n")
        with pytest.raises(ConfigError, match="is not a module name"):
            load_config(tmp_path / "t.yaml")
