"""A trained ChemGPT leaves chemscale as a Hugging Face model (issue 8, item 22).

A tiny run is trained, exported with the CLI, and reloaded in a fresh Python process that
never imports chemscale and has the Hub switched off (HF_HUB_OFFLINE=1), with the Auto
classes a user would call. Its logits, tokens and generations are compared with chemscale's.
"""

import json
import os
import subprocess
import sys

import pytest
import selfies as sf
import torch

from chemscale import export, lm, molecules, runs, train
from chemscale.tokenizer import BOS_ID, EOS_ID, Tokenizer
from conftest import tiny_lm_config

pytest.importorskip("transformers")

RELOAD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

out_dir, inputs, result = sys.argv[1:]
selfies = json.load(open(inputs))
tokenizer = AutoTokenizer.from_pretrained(out_dir)
model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
batch = tokenizer(selfies[:8], padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
    greedy = model.generate(do_sample=False)
    torch.manual_seed(0)
    sampled = model.generate(do_sample=True, num_return_sequences=8)
torch.save({
    "classes": [type(tokenizer).__name__, type(model).__name__], "chemscale_imported": "chemscale" in sys.modules,
    "ids": tokenizer(selfies)["input_ids"], "decoded": tokenizer.batch_decode(tokenizer(selfies)["input_ids"],
                                                                             skip_special_tokens=True),
    "batch": batch["input_ids"], "mask": batch["attention_mask"], "logits": logits,
    "greedy": greedy[0].tolist(), "sampled": sampled.tolist(),
}, result)
"""


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny ChemGPT run, trained to the end (torch's process state put back afterwards)."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        run_dir = runs.create("t", tiny_lm_config(max_steps=40, val_every_steps=20), tmp_path_factory.mktemp("runs"))
        assert train.train(run_dir)["status"] == "finished"
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
    return run_dir


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "chemgpt-hf"
    assert export.main([str(trained_run), str(out)]) == 0
    return out


def _reload(out_dir, selfies, tmp_path):
    """Load the export with transformers' Auto classes in a fresh process without network or chemscale."""
    (tmp_path / "in.json").write_text(json.dumps(selfies))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(out_dir), str(tmp_path / "in.json"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "out.pt", weights_only=False)


def test_export_reloads_with_auto_classes_and_matches_chemscale(trained_run, exported, tmp_path):
    model, train_corpus = lm.load_best(trained_run)
    tok = train_corpus.tokenizer
    selfies = [sf.encoder(s) for s in train_corpus.smiles()[:64]]  # real MOSES molecules
    got = _reload(exported, selfies + ["[C][Xe][O]"], tmp_path)
    assert got["classes"][1] == "GPTNeoForCausalLM" and not got["chemscale_imported"]

    # the tokenizer: chemscale's ids ([BOS] ... [EOS], unknown symbols -> [UNK]) and SELFIES back
    assert got["ids"] == [tok.encode(s) for s in selfies + ["[C][Xe][O]"]]
    assert got["decoded"][:-1] == selfies == [tok.decode(tok.encode(s)) for s in selfies]

    # the model: chemscale's logits on a right-padded batch, at every real token
    batch, mask = got["batch"], got["mask"].bool()
    with torch.no_grad():
        ours = model(batch)[0]
    torch.testing.assert_close(got["logits"][mask], ours[mask], atol=1e-5, rtol=0)

    # generation from [BOS]: greedy is chemscale's greedy sample, and it decodes to a molecule
    def written(ids):  # the tokens after [BOS], up to [EOS], as chemscale's sampler returns them
        assert ids[0] == BOS_ID
        return ids[1:ids.index(EOS_ID)] if EOS_ID in ids else ids[1:]

    greedy = written(got["greedy"])
    assert greedy == model.sample(1, temperature=0)[0]
    smiles = molecules.selfies_to_smiles(["".join(tok.symbols[i] for i in written(ids)) for ids in
                                          [got["greedy"], *got["sampled"]]])
    assert molecules.canonical(smiles[0]), f"greedy sample {tok.decode(greedy)!r} is not a molecule"
    assert any(molecules.canonical(s) for s in smiles[1:]), "no sampled sequence is a molecule"


def test_export_writes_card_and_keeps_vocabulary_in_run(trained_run, exported):
    model, train_corpus = lm.load_best(trained_run)
    assert Tokenizer.load(trained_run / export.VOCAB) == train_corpus.tokenizer
    result = runs.read_result(trained_run)
    card = (exported / "README.md").read_text()
    assert f"{result['best_val_loss']:.4f} nats per token" in card
    assert f"{model.n_params(non_embedding=False):,} parameters" in card and "`moses`: 200 training molecules" in card
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "gpt_neo" and config["vocab_size"] == len(train_corpus.tokenizer)
    assert json.loads((exported / "generation_config.json").read_text())["max_length"] == model.config.n_positions
    tokenizer_class = json.loads((exported / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert tokenizer_class == "PreTrainedTokenizerFast", "the name transformers 4.x and 5.x both resolve"


def _error(capsys, *argv) -> str:
    capsys.readouterr()
    assert export.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_export_refuses_a_non_empty_folder_unless_forced(trained_run, exported, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "not empty" in _error(capsys, trained_run, out) and (out / "notes.txt").exists()
    assert "not a folder" in _error(capsys, trained_run, out / "notes.txt")
    assert export.main([str(trained_run), str(out), "--force"]) == 0
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in exported.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left behind"
    assert "the run" in _error(capsys, trained_run, trained_run.parent, "--force") and trained_run.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export.main([str(trained_run), str(empty)]) == 0  # an empty folder is no obstacle


def test_export_refuses_runs_without_best_weights(runs_root, tmp_path, capsys):
    untrained = runs.create("t", tiny_lm_config(), runs_root)
    message = _error(capsys, untrained, tmp_path / "out")
    assert "best.pt" in message and str(untrained) in message and not (tmp_path / "out").exists()
    assert "no such run folder" in _error(capsys, runs_root / "missing", tmp_path / "out")
    ff_run = runs.create("f", {"study": "f", "task": "ff"}, runs_root)
    assert "only ChemGPT runs" in _error(capsys, ff_run, tmp_path / "out")


def test_export_refuses_a_vocabulary_that_changed(trained_run, tmp_path, capsys):
    kept = trained_run / export.VOCAB
    original = kept.read_bytes() if kept.exists() else None
    Tokenizer(["[C]", "[N]"]).save(kept)
    try:
        assert "differs from the corpus cache" in _error(capsys, trained_run, tmp_path / "out")
    finally:
        kept.unlink()
        if original is not None:
            kept.write_bytes(original)
