"""The README's main job: `bif-fast demo` (tiny GPT-NeoX trained here, per-token BIF, HTML report)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="the language-model demo needs transformers")

from bif_fast import BIFConfig, SGLDConfig  # noqa: E402
from bif_fast.demo import DEMO_QUERIES, demo_corpus, run_lm_demo  # noqa: E402


def test_corpus_ships_with_python_and_holds_the_exact_queries():
    corpus = demo_corpus()
    assert 20 <= len(corpus) <= 48 and all(0 < len(p) <= 64 for p in corpus)
    assert DEMO_QUERIES[0] in corpus and DEMO_QUERIES[1] in corpus


def test_short_demo_writes_a_report(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU path a user gets, not the test interpreter
    cfg = BIFConfig(sgld=SGLDConfig(lr=1e-4, nbeta=100.0, localization=300.0), num_chains=2, num_draws=8,
                    batch_size=16)  # fmt: skip
    summary = run_lm_demo(out_dir=str(tmp_path), config=cfg, train_steps=40, quiet=True)
    html = (tmp_path / "index.html").read_text()
    assert summary["diverged"] == [False, False]
    assert summary["scores"].shape == (len(demo_corpus()), len(DEMO_QUERIES))
    assert html.count("<h3>query") == len(DEMO_QUERIES) and "<svg" in html
    data = re.search(r'<script type="application/json" id="bif-data">(.*?)</script>', html, flags=re.S)
    json.loads(data.group(1), parse_constant=lambda c: pytest.fail(f"non-finite {c} in the explorer's data"))
    text = re.sub(r"<script.*?</script>", "", html, flags=re.S)  # base64 and code may spell "nan" by chance
    assert "nan" not in text.lower()


def test_demo_command_finds_the_source_of_copied_sentences(tmp_path):
    """The full main job, as the README runs it, on the calibrated defaults: queries copied from a training
    passage must rank that passage first (the BIF's most basic promise). About 2.5 minutes on an idle 2-core
    machine (20 s of training, ~65 s of calibration, ~60 s of sampling)."""
    out = subprocess.run(
        [sys.executable, "-m", "bif_fast", "demo", "--out", str(tmp_path / "report")],
        capture_output=True, text=True, check=True, timeout=900,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )  # fmt: skip
    lines = out.stdout.splitlines()
    assert any(line.startswith("calibrated in") for line in lines), out.stdout
    for q in DEMO_QUERIES[:2]:
        head = f"query {DEMO_QUERIES.index(q)}: {q!r}  (top proponents, posterior correlation = -normalised BIF)"
        first = lines[lines.index(head) + 1]
        assert repr(q) in first, first
    assert (tmp_path / "report" / "index.html").exists()
