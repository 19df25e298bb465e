import os

# One thread per process: tests run beside other processes (and spawn subprocesses), and OpenMP threads
# competing for 2 busy cores made tiny steps up to ~80x slower than a single thread. Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    yield


def tiny_model_config(**over):
    from blueberry.config import ModelConfig

    base = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=97, seq_len=16, ffn_mult=2)
    base.update(over)
    return ModelConfig(**base)


WORDS = (
    "the a people nation congress year law state union war peace trade money bank tax school work family "
    "government country world freedom power future history children health energy army navy court right "
    "will must shall can have has made make new great good free strong fair just our their we they it"
).split()


def write_corpus(folder, n_docs: int = 40, words_per_doc: int = 400, seed: int = 0):
    """A folder of .txt documents of pseudo-English (deterministic), one document per file."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        sentences = []
        for _ in range(words_per_doc // 10):
            s = " ".join(rng.choice(WORDS) for _ in range(10))
            sentences.append(s.capitalize() + ".")
        (folder / f"doc{i:03d}.txt").write_text(f"Document {i}. " + " ".join(sentences) + "\n")
    return folder


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def tiny_run_overrides(corpus, cache, **extra) -> list[str]:
    """--set overrides for a seconds-long CPU run on the tiny corpus."""
    over = {
        "model.n_layers": 2,
        "model.d_model": 32,
        "model.n_heads": 4,
        "model.n_kv_heads": 2,
        "model.seq_len": 32,
        "model.ffn_mult": 2,
        "tokenizer.vocab_size": 300,
        "data.source": str(corpus),
        "data.cache_dir": str(cache),
        "eval.val_tokens": 2048,
        "eval.batch_size": 32,
        "eval.every": 0.1,
        "train.micro_batch": 4,
        "train.grad_accum": 1,
        "train.compile": False,
        "train.log_every": 1,
        "budget.time": None,
        "budget.steps": 20,
    }
    over.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in over.items()]
