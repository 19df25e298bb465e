"""Generate text from a trained Blueberry model, or benchmark KV-cached decoding.

    python inference.py                               # best finished run in ./mlflow.db, prompt "Once upon a time"
    python inference.py --ablation qk_norm --variant off --prompt "The cat"
    python inference.py --checkpoint runs/x/checkpoint --interactive
    python inference.py --benchmark --preset blueberry-seed

The checkpoint folder carries the config and tokenizer, so nothing else is needed to rebuild the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from blueberry.errors import BlueberryError, run_cli

DEFAULT_URI = "sqlite:///mlflow.db"
EOT = "<|endoftext|>"


class NoRunsError(BlueberryError):
    """The tracking store has no run we could load."""


# ---- choosing the checkpoint ----------------------------------------------------------------------------


@dataclass
class RunInfo:
    """Which model was loaded, for the stderr banner and the JSON output."""

    checkpoint: str
    run_id: str | None = None
    experiment: str | None = None
    ablation: str | None = None
    variant: str | None = None
    seed: str | None = None
    status: str | None = None
    val_bpb: float | None = None
    val_loss: float | None = None

    def describe(self) -> str:
        if self.run_id is None:
            return f"loaded checkpoint {self.checkpoint}"
        metrics = ", ".join(
            f"{k} {v:.4f}"
            for k, v in (("val_bpb", self.val_bpb), ("val_loss", self.val_loss))
            if v is not None
        )
        status = "" if self.status == "finished" else f"; status {self.status}"
        return (
            f"loaded run {self.run_id} (ablation {self.ablation}, variant {self.variant}, seed {self.seed}; "
            f"{metrics or 'no val metrics'}{status}) from {self.checkpoint}"
        )


def tracking_uri(arg: str | None) -> str:
    return arg or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _local_store_path(uri: str) -> Path | None:
    """The file or folder a local tracking URI points at (None for servers and databases over a network)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if "://" not in uri:
        return Path(uri)
    return None


def open_store(uri: str):
    """An MlflowClient for an existing store. Never creates one: MLflow would make an empty mlflow.db."""
    local = _local_store_path(uri)
    if local is not None and not local.exists():
        raise NoRunsError(f"no finished runs with a checkpoint in {uri} (no such store); {_HINT}")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"mlflow(\.|$)")
    try:
        from mlflow import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        return MlflowClient(tracking_uri=uri)
    except Exception as e:  # noqa: BLE001 - any store failure is one line for the user
        raise BlueberryError(f"cannot open tracking store {uri}: {_first_line(e)}") from None


_HINT = "run an ablation first or pass --checkpoint DIR"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _paged(call, **kwargs) -> list:
    out, token = [], None
    while True:
        page = call(page_token=token, **kwargs)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _run_info(run, experiment: str | None = None) -> RunInfo:
    tags, metrics = run.data.tags, run.data.metrics
    return RunInfo(
        checkpoint=tags.get("checkpoint", ""),
        run_id=run.info.run_id,
        experiment=experiment,
        ablation=tags.get("ablation"),
        variant=tags.get("variant"),
        seed=tags.get("seed"),
        status=tags.get("status"),
        val_bpb=metrics.get("val_bpb"),
        val_loss=metrics.get("val_loss"),
    )


def select_run(
    uri: str,
    run_id: str | None = None,
    ablation: str | None = None,
    experiment: str | None = None,
    variant: str | None = None,
) -> RunInfo:
    """`run_id` if given, else the finished run with the lowest final val_bpb whose checkpoint exists."""
    client = open_store(uri)
    try:
        return _select_run(client, uri, run_id, ablation, experiment, variant)
    except BlueberryError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow raises many types; the user needs one line
        if run_id is not None and "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")):
            raise BlueberryError(f"no run with id {run_id!r} in {uri}") from None
        raise BlueberryError(f"cannot read tracking store {uri}: {_first_line(e)}") from None


def _select_run(client, uri, run_id, ablation, experiment, variant) -> RunInfo:
    from mlflow.entities import ViewType

    if run_id is not None:
        info = _run_info(client.get_run(run_id))
        if not info.checkpoint:
            raise BlueberryError(f"run {run_id} has no checkpoint tag (it did not finish?); {_HINT}")
        if not Path(info.checkpoint).exists():
            raise BlueberryError(f"run {run_id}: checkpoint {info.checkpoint} does not exist")
        return info
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise NoRunsError(f"no experiment named {experiment!r} in {uri}; {_HINT}")
        experiments = [exp]
    else:
        experiments = _paged(client.search_experiments, view_type=ViewType.ACTIVE_ONLY, max_results=1000)
    names = {e.experiment_id: e.name for e in experiments}
    runs = _paged(
        client.search_runs,
        experiment_ids=list(names),
        filter_string="tags.status = 'finished'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1000,
    )
    candidates = []
    for run in runs:
        info = _run_info(run, names.get(run.info.experiment_id))
        if ablation is not None and info.ablation != ablation:
            continue
        if variant is not None and info.variant != variant:
            continue
        if info.val_bpb is None or not math.isfinite(info.val_bpb):
            continue
        if not info.checkpoint or not Path(info.checkpoint).exists():
            continue
        candidates.append(info)
    if not candidates:
        where = ", ".join(
            f"{k} {v!r}"
            for k, v in (("experiment", experiment), ("ablation", ablation), ("variant", variant))
            if v
        )
        raise NoRunsError(
            f"no finished runs with a checkpoint in {uri}{f' ({where})' if where else ''}; {_HINT}"
        )
    return min(candidates, key=lambda r: (r.val_bpb, r.val_loss if r.val_loss is not None else math.inf))


# ---- loading -----------------------------------------------------------------------------------------------


def load_for_inference(path: str | Path, device, dtype):
    """(model, RunConfig, tokenizer or None, meta) on `device` in `dtype`, from a checkpoint folder."""
    from blueberry.checkpoint import CheckpointError, load_model
    from blueberry.generate import cast_for_inference

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    try:  # load_model imports the config's plugins and reports a bad config as one line
        model, cfg, tokenizer, meta = load_model(path, "cpu")
    except (OSError, RuntimeError, ValueError) as e:  # e.g. safetensors header damage with a matching hash
        raise CheckpointError(f"{path}: cannot load weights: {_first_line(e)}") from None
    return cast_for_inference(model, device, dtype), cfg, tokenizer, meta


def resolve_device_dtype(device_name: str, dtype_name: str):
    import torch

    from blueberry.generate import pick_device, pick_dtype

    device = pick_device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BlueberryError("--device cuda: no CUDA device is available")
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise BlueberryError("--device mps: MPS is not available")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    return device, dtypes[dtype_name] if dtype_name != "auto" else pick_dtype(device)


# ---- output ------------------------------------------------------------------------------------------------


class StreamPrinter:
    """Print a completion as it grows: decode all ids so far and print only the new suffix.

    Byte-level BPE can split one UTF-8 character over several tokens; while the text ends in a half
    character (U+FFFD) we wait for the next token rather than print garbage.
    """

    def __init__(self, tokenizer, out=None):
        self.tokenizer = tokenizer
        self.out = out or sys.stdout
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def _emit(self, text: str) -> None:
        common = len(os.path.commonprefix([self.printed, text]))
        if common < len(self.printed):  # a rare re-merge changed printed text: it cannot be unprinted
            text = self.printed + text[common:]
        self.out.write(text[len(self.printed) :])
        self.out.flush()
        self.printed = text

    def finish(self) -> None:
        self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=True))


def _prompts(args) -> list[str] | None:
    """The prompts to run up front (None: interactive)."""
    if args.interactive:
        return None
    if args.prompts is not None:
        try:
            lines = Path(args.prompts).read_text().splitlines()
        except OSError as e:
            raise BlueberryError(f"--prompts {args.prompts}: {e.strerror or e}") from None
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise BlueberryError(f"--prompts {args.prompts}: no prompts (one per line)")
        return prompts
    return [args.prompt]


def _interactive_prompts():
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return
        yield line.rstrip("\n")


# ---- main --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inference.py",
        description="Generate text from a trained Blueberry checkpoint (by default the best finished run).",
    )
    g = p.add_argument_group("which model")
    g.add_argument("--checkpoint", metavar="DIR", help="a checkpoint folder (no tracking store needed)")
    g.add_argument("--run-id", metavar="ID", help="an MLflow run id")
    g.add_argument("--ablation", metavar="NAME", help="only runs tagged with this ablation")
    g.add_argument("--experiment", metavar="NAME", help="only runs in this MLflow experiment")
    g.add_argument("--variant", metavar="NAME", help="only runs of this variant")
    g.add_argument("--tracking-uri", metavar="URI", help=f"default: $MLFLOW_TRACKING_URI or {DEFAULT_URI}")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    s = p.add_argument_group("generation")
    s.add_argument("--prompt", default="Once upon a time")
    s.add_argument("--prompts", metavar="FILE", help="one prompt per line; each is generated")
    s.add_argument("--interactive", action="store_true", help="read prompts from stdin until EOF/empty line")
    s.add_argument(
        "--max-new-tokens",
        "--new-tokens",
        dest="max_new_tokens",
        type=int,
        default=None,
        help="default 200 (256 with --benchmark)",
    )
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=50, help="0 = off")
    s.add_argument("--top-p", type=float, default=0.9, help="1 = off")
    s.add_argument("--repetition-penalty", type=float, default=1.1, help="1 = off")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument(
        "--no-bos", action="store_true", help=f"do not start the prompt with {EOT} (the document separator)"
    )
    s.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout; no streaming")
    b = p.add_argument_group("benchmark")
    b.add_argument(
        "--benchmark", action="store_true", help="time prefill and decoding with and without cache"
    )
    b.add_argument(
        "--preset", metavar="NAME", help="with --benchmark: a randomly initialised model of this preset"
    )
    b.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return p


def _check_args(args) -> None:
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise BlueberryError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise BlueberryError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise BlueberryError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.repetition_penalty <= 0:
        raise BlueberryError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.preset and not args.benchmark:
        raise BlueberryError("--preset only applies with --benchmark (a random model cannot write text)")
    if args.checkpoint and (args.run_id or args.ablation or args.experiment or args.variant):
        raise BlueberryError(
            "--checkpoint cannot be combined with --run-id/--ablation/--experiment/--variant"
        )
    if args.threads is not None and args.threads <= 0:
        raise BlueberryError(f"--threads must be positive, got {args.threads}")


def _choose_checkpoint(args) -> RunInfo:
    if args.checkpoint:
        return RunInfo(checkpoint=str(Path(args.checkpoint)))
    return select_run(
        tracking_uri(args.tracking_uri), args.run_id, args.ablation, args.experiment, args.variant
    )


def _benchmark(args, device, dtype) -> int:
    from blueberry.generate import format_benchmark, inference_benchmark, random_preset_model

    new_tokens = 256 if args.max_new_tokens is None else args.max_new_tokens
    preset = args.preset
    if preset is None:
        try:
            info = _choose_checkpoint(args)
        except NoRunsError as e:
            if args.run_id or args.ablation or args.experiment or args.variant:
                raise
            preset = "blueberry-seed"
            print(f"{e}\nbenchmarking a randomly initialised {preset} model instead", file=sys.stderr)
    if preset is not None:
        from blueberry.config import preset_names
        from blueberry.generate import cast_for_inference

        if preset not in preset_names():
            raise BlueberryError(
                f"--preset: unknown preset {preset!r}; available: {', '.join(preset_names())}"
            )
        model, label = cast_for_inference(random_preset_model(preset), device, dtype), f"preset:{preset}"
    else:
        model, _, _, _ = load_for_inference(info.checkpoint, device, dtype)
        label = info.run_id or info.checkpoint
        print(info.describe(), file=sys.stderr)
    record = inference_benchmark(model, label, new_tokens=max(2, new_tokens))
    if not args.json:
        print("\n".join(format_benchmark(record)))
    print(json.dumps(record), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if args.benchmark:
        return _benchmark(args, device, dtype)

    prompts = _prompts(args)  # read --prompts before the (slow) model load, so a typo fails fast
    info = _choose_checkpoint(args)
    model, _cfg, tokenizer, _meta = load_for_inference(info.checkpoint, device, dtype)
    if tokenizer is None:
        raise BlueberryError(
            f"{info.checkpoint}: checkpoint has no tokenizer.json, so prompts cannot be encoded"
        )
    print(info.describe(), file=sys.stderr)
    eot_id = tokenizer.token_to_id(EOT)
    vocab = int(model.cfg.vocab_size)
    if tokenizer.get_vocab_size() > vocab:
        raise BlueberryError(
            f"{info.checkpoint}: tokenizer has {tokenizer.get_vocab_size()} tokens but the model only {vocab}"
        )
    for prompt in prompts if prompts is not None else _interactive_prompts():
        _generate_one(args, model, tokenizer, eot_id, prompt, info)
    return 0


def _generate_one(args, model, tokenizer, eot_id: int | None, prompt: str, info: RunInfo) -> None:
    from blueberry.generate import generate_full

    ids = tokenizer.encode(prompt).ids
    if eot_id is not None and not args.no_bos:
        ids = [eot_id] + ids
    if not ids:
        raise BlueberryError("empty prompt (and --no-bos): nothing to continue from")
    stream = None if args.json else StreamPrinter(tokenizer)
    if stream is not None:
        print(prompt, end="", flush=True)
    t0 = time.perf_counter()
    (gen,) = generate_full(
        model,
        ids,
        max_new_tokens=200 if args.max_new_tokens is None else args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        eot_id=eot_id,
        seed=args.seed,
        on_token=stream,
    )
    seconds = time.perf_counter() - t0
    completion = tokenizer.decode(gen.tokens, skip_special_tokens=True)
    if args.json:
        record: dict[str, Any] = {
            "prompt": prompt,
            "completion": completion,
            "tokens": len(gen.tokens),
            "token_ids": gen.tokens,
            "stop": gen.stop,
            "seconds": round(seconds, 4),
            "run": asdict(info),
        }
        print(json.dumps(record), flush=True)
    else:
        stream.finish()
        print(flush=True)
        rate = len(gen.tokens) / seconds if seconds > 0 else float("inf")
        print(f"[{len(gen.tokens)} tokens, {rate:.1f} tokens/s, stop: {gen.stop}]", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
