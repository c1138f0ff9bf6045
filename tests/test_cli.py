"""``bif-fast run | report | top`` on a tiny Hugging Face model folder made here: results equal the API's,
the output folder is complete or absent, and bad input gets a one-line error with exit code 2."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from bif_fast import BIFConfig, BIFResult, compute_bif  # noqa: E402
from bif_fast.__main__ import main  # noqa: E402

TRAIN = ["the cat sat on the mat", "a dog ran in the park", "the cat ate the fish", "birds fly over the sea",
         "a cat and a dog", "the sun is hot today"]  # fmt: skip
QUERY = ["the cat sat", "a bird flew"]
CONFIG = {"sgld": {"lr": 1e-4, "nbeta": 100.0, "localization": 300.0}, "num_chains": 2, "num_draws": 12,
          "batch_size": 3, "seed": 1}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A GPT-NeoX with a character-level fast tokenizer, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_lm")
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(string.printable[:95])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    lm = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32, max_position_embeddings=64))
    lm.save_pretrained(folder)
    return folder


@pytest.fixture()
def files(tmp_path) -> dict[str, Path]:
    paths = {"train": tmp_path / "train.txt", "query": tmp_path / "query.jsonl", "config": tmp_path / "cfg.json"}
    paths["train"].write_text("\n".join(TRAIN) + "\n\n")  # a blank line is not an example
    paths["query"].write_text("".join(json.dumps({"text": q, "id": i}) + "\n" for i, q in enumerate(QUERY)))
    paths["config"].write_text(json.dumps(CONFIG))
    return paths


def _run(model_dir, files, out, *extra) -> int:
    return main(["run", "--model", str(model_dir), "--train", str(files["train"]), "--query", str(files["query"]),
                 "--out", str(out), "--config", str(files["config"]), *extra])  # fmt: skip


def _api(model_dir, per_token: bool, params_pattern: str | None = None) -> BIFResult:
    """What compute_bif gives for the same model, texts and config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bif_fast import cli
    from bif_fast.losses import causal_lm

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    train, _ = cli._encode(tok, TRAIN, 256)
    query, _ = cli._encode(tok, QUERY, 256)
    loss = causal_lm(model)
    params = cli._select_params(model, params_pattern)
    return compute_bif(model, train, query, loss_fn=loss if per_token else cli._SequenceLoss(loss),
                       config=BIFConfig.from_dict(CONFIG), per_token=per_token, params=params)  # fmt: skip


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sequence", "per_token"])
def test_run_writes_the_result_the_api_computes_with_its_report(model_dir, files, tmp_path, capsys, per_token):
    out = tmp_path / "out"
    assert _run(model_dir, files, out, *(["--per-token"] if per_token else [])) == 0
    res = BIFResult.load(out)
    want = _api(model_dir, per_token)
    assert torch.equal(res.bif, want.bif) and torch.equal(res.bif_normalized, want.bif_normalized)
    assert res.bif.shape[1] == (len(QUERY) if not per_token else int(want.query_index.shape[0]))
    texts = json.loads((out / "texts.json").read_text())
    assert texts["train"] == TRAIN and texts["query"] == QUERY and texts["per_token"] is per_token
    assert [len(t) for t in texts["train_tokens"]] == [len(t) for t in TRAIN]  # one character per token here
    page = (out / "index.html").read_text()
    assert "<html" in page and "query 1" in page
    printed = capsys.readouterr().out
    assert "query 0: the cat sat" in printed and "proponents" in printed
    assert not list(tmp_path.glob("out.tmp-*"))


def test_top_prints_proponents_and_opponents_in_order_and_report_renders_again(model_dir, files, tmp_path, capsys):
    from bif_fast.cli import sequence_scores

    out = tmp_path / "out"
    assert _run(model_dir, files, out, "--params", "*attention*") == 0
    res = BIFResult.load(out)
    assert torch.equal(res.bif, _api(model_dir, False, "*attention*").bif)
    capsys.readouterr()
    assert main(["top", str(out), "--query", "1", "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    scores = sequence_scores(res)[:, 1]
    values = [float(line.split()[0]) for line in lines if line.startswith("    ")]
    assert values[:2] == pytest.approx(scores.topk(2).values.tolist(), abs=1e-3)
    assert values[2:] == pytest.approx(scores.topk(2, largest=False).values.tolist(), abs=1e-3)
    (out / "index.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "index.html").exists()


@pytest.mark.parametrize("change, match", [
    ({"train": "missing.txt"}, "--train .*missing.txt: no such file"),
    ({"train_text": ""}, "--train .*: no examples"),
    ({"query_text": '{"text": "ok"}\n{"txt": "no"}\n'}, "line 2 has no string 'text' field"),
    ({"config_text": '{"num_chains": 2, "temperature": 1}'}, r"unknown BIFConfig fields \['temperature'\]"),
    ({"config_text": "[1, 2]"}, "expected a mapping"),
    ({"params": "*nothing*"}, "selects no weight"),
    ({"no_tokenizer": True}, "no usable tokenizer"),
    ({"out_taken": True}, "exists and is not an empty folder"),
    ({"device": "nowhere"}, "--device nowhere: cannot put the model there"),
])  # fmt: skip
def test_bad_input_is_one_line_with_exit_code_2_and_nothing_written(model_dir, files, tmp_path, capsys, change,
                                                                     match):  # fmt: skip
    import re
    import shutil

    if "train_text" in change:
        files["train"].write_text(change["train_text"])
    if "query_text" in change:
        files["query"].write_text(change["query_text"])
    if "config_text" in change:
        files["config"].write_text(change["config_text"])
    if "train" in change:
        files["train"] = tmp_path / change["train"]
    if change.get("no_tokenizer"):
        bare = tmp_path / "bare"
        bare.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(model_dir / name, bare / name)
        model_dir = bare
    out = tmp_path / "out"
    if change.get("out_taken"):
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    extra = ["--params", change["params"]] if "params" in change else []
    extra += ["--device", change["device"]] if "device" in change else []
    capsys.readouterr()
    assert _run(model_dir, files, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err
    assert "Traceback" not in err[0]
    if change.get("out_taken"):
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()
    assert not list(tmp_path.glob("out.tmp-*"))


def test_without_a_config_the_calibrated_defaults_run_and_are_recorded(model_dir, files, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["run", "--model", str(model_dir), "--train", str(files["train"]), "--query", str(files["query"]),
            "--out", str(out), "--budget", "4"]  # fmt: skip
    assert main(args) == 0
    res = BIFResult.load(out)
    assert "calibration" in res.diagnostics and torch.isfinite(res.bif).all()
    assert "calibrating" in capsys.readouterr().err


def test_a_model_loaded_in_bf16_runs(model_dir, files, tmp_path):
    out = tmp_path / "out"
    assert _run(model_dir, files, out, "--dtype", "bfloat16", "--device", "cpu") == 0
    res = BIFResult.load(out)
    assert torch.isfinite(res.bif).all() and res.bif.abs().max() > 0


def test_a_run_whose_chains_all_diverge_says_so_in_one_line_and_writes_nothing(model_dir, files, tmp_path, capsys):
    files["config"].write_text(json.dumps({**CONFIG, "sgld": {"lr": 1e4, "nbeta": 1e6, "localization": 0.0}}))
    out = tmp_path / "out"
    assert _run(model_dir, files, out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "every chain diverged" in err[-1] and not out.exists()


def test_saved_run_commands_refuse_what_run_did_not_write(tmp_path, capsys):
    assert main(["top", str(tmp_path), "--query", "0"]) == 2
    assert "not a folder written by `bif-fast run`" in capsys.readouterr().err
