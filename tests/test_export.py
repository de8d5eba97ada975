"""A trained ChemGPT leaves chemscale as a Hugging Face model (issue 8, item 22).

A tiny run is trained, exported with the CLI, and reloaded in a fresh Python process that
never imports chemscale and has the Hub switched off (HF_HUB_OFFLINE=1), with the Auto
classes a user would call. Its logits, tokens and generations are compared with chemscale's.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import selfies as sf
import torch

from chemscale import runs, train
from chemscale.lm import best, corpus, export, molecules, vocabulary
from chemscale.config import ConfigError
from chemscale.lm.tokenizer import BOS_ID, EOS_ID, Tokenizer
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
    prompt = tokenizer("[C][C]", return_tensors="pt")
    continued = model.generate(**prompt, do_sample=False, max_length=12)
    torch.manual_seed(0)
    sampled = model.generate(do_sample=True, num_return_sequences=8)
torch.save({
    "classes": [type(tokenizer).__name__, type(model).__name__], "chemscale_imported": "chemscale" in sys.modules,
    "ids": tokenizer(selfies)["input_ids"], "decoded": tokenizer.batch_decode(tokenizer(selfies)["input_ids"],
                                                                             skip_special_tokens=True),
    "batch": batch["input_ids"], "mask": batch["attention_mask"], "logits": logits,
    "greedy": greedy[0].tolist(), "sampled": sampled.tolist(),
    "prompt": prompt["input_ids"][0].tolist(), "continued": continued[0].tolist(),
    "with_eos": tokenizer([s + "[EOS]" for s in selfies])["input_ids"],
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


MALFORMED = ["CCO", "[C] [C]", "[C]x[O]", "[C]..[O]", " [C]", "[C][C", "["]  # issue 8 review, item 12


def _reload(out_dir, selfies, tmp_path):
    """Load the export with transformers' Auto classes in a fresh process without network or chemscale."""
    (tmp_path / "in.json").write_text(json.dumps(selfies))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(out_dir), str(tmp_path / "in.json"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "out.pt", weights_only=False)


def test_export_reloads_with_auto_classes_and_matches_chemscale(trained_run, exported, tmp_path):
    model, train_corpus = best.load_best(trained_run)
    tok = train_corpus.tokenizer
    selfies = [sf.encoder(s) for s in train_corpus.smiles()[:64]]  # real MOSES molecules
    malformed = ["[C][Xe][O]", *MALFORMED]
    got = _reload(exported, selfies + malformed, tmp_path)
    assert got["classes"][1] == "GPTNeoForCausalLM" and not got["chemscale_imported"]

    # the tokenizer: chemscale's ids, [BOS] then symbols (unknown ones and stray text -> [UNK]), no [EOS]
    # (a prompt must not end the molecule); "...[EOS]" gives the training framing; SELFIES back
    assert got["ids"] == [tok.encode(s)[:-1] for s in selfies + malformed]
    assert got["with_eos"] == [tok.encode(s) for s in selfies + malformed]
    assert got["decoded"][:len(selfies)] == selfies == [tok.decode(tok.encode(s)) for s in selfies]
    assert got["prompt"] == tok.encode("[C][C]")[:-1] and got["continued"][:3] == got["prompt"]

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


def test_export_writes_card(trained_run, exported):
    model, train_corpus = best.load_best(trained_run)
    result = runs.read_result(trained_run)
    card = (exported / "README.md").read_text()
    assert f"{result['best_val_loss']:.4f} nats per token" in card
    assert f"test loss {result['test_loss']:.4f} nats per token on {result['n_test_molecules']:,} held-out" in card
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


def test_export_replaces_only_an_earlier_export(trained_run, exported, tmp_path, capsys):
    """--force replaces an earlier export, never a folder of the user's (a git repository: item 2)."""
    out = tmp_path / "out"
    (out / ".git").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    for argv in ([trained_run, out], [trained_run, out, "--force"]):
        assert "not an earlier export" in _error(capsys, *argv)
        assert (out / "notes.txt").exists() and (out / ".git").is_dir()
    assert "not a folder" in _error(capsys, trained_run, out / "notes.txt")
    again = tmp_path / "again"
    shutil.copytree(exported, again)
    (again / "stale.txt").write_text("from an older export")
    assert "earlier export (pass --force" in _error(capsys, trained_run, again)
    assert export.main([str(trained_run), str(again), "--force"]) == 0
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in exported.iterdir())
    assert export.MARKER in os.listdir(again) and not (again / "stale.txt").exists()
    hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not hidden, f"temporary folders left behind: {hidden}"
    assert "the run" in _error(capsys, trained_run, trained_run.parent, "--force") and trained_run.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export.main([str(trained_run), str(empty)]) == 0  # an empty folder is no obstacle


def test_export_to_the_current_folder_cleans_after_a_killed_export(trained_run, tmp_path, monkeypatch, capsys):
    """Items 10 and 11: '.' is refused in one line (replacing it would strand the shell); a killed
    export's leftovers go; modes follow the umask."""
    out = tmp_path / "here"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".here.export-{int(dead.stdout)}.tmp"  # a pid that no longer runs
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    monkeypatch.chdir(out)
    for argv in (".", "--force"), (".",), (str(tmp_path), "--force"):
        assert "the current folder" in _error(capsys, trained_run, *argv)
    monkeypatch.chdir(tmp_path)
    old_umask = os.umask(0o022)
    try:
        assert export.main([str(trained_run), "here"]) == 0
    finally:
        os.umask(old_umask)
    assert (out / "model.safetensors").is_file() and not stale.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert oct(out.stat().st_mode & 0o777) == oct(0o755), "the umask decides, not mkdtemp's 0700"


def test_export_refuses_runs_without_best_weights(runs_root, tmp_path, capsys):
    untrained = runs.create("t", tiny_lm_config(), runs_root)
    message = _error(capsys, untrained, tmp_path / "out")
    assert "best.pt" in message and str(untrained) in message and not (tmp_path / "out").exists()
    assert "no such run folder" in _error(capsys, runs_root / "missing", tmp_path / "out")
    ff_run = runs.create("f", {"study": "f", "task": "ff"}, runs_root)
    assert "only ChemGPT runs" in _error(capsys, ff_run, tmp_path / "out")


def _copy_run(run_dir: Path, tmp_path: Path, leave_out=()) -> Path:
    """A copy of a run folder (same name: its id), without the files named."""
    copy = tmp_path / "copies" / run_dir.parent.name / run_dir.name
    shutil.copytree(run_dir, copy, ignore=lambda d, names: [n for n in names if n in leave_out])
    return copy


def test_damaged_runs_are_named_not_tracebacks(trained_run, tmp_path, capsys):
    """Item 7: damaged or foreign weights, and an edited config.json, give one line naming the file."""
    run = _copy_run(trained_run, tmp_path)
    best, whole = run / "best.pt", (trained_run / "best.pt").read_bytes()
    damaged = {"truncated": whole[:5000], "empty": b"", "foreign": None}
    for what, content in damaged.items():
        if content is None:
            torch.save({"interaction.weight": torch.zeros(3, 3)}, best)  # another model's state dict
        else:
            best.write_bytes(content)
        message = _error(capsys, run, tmp_path / what)
        assert f"{best}: not the ChemGPT weights" in message and "--retrain" in message, (what, message)
        assert not (tmp_path / what).exists()
    best.write_bytes(whole)
    config = json.loads((run / runs.CONFIG).read_text())
    config["model"]["width"] = 32
    (run / runs.CONFIG).write_text(json.dumps(config))
    message = _error(capsys, run, tmp_path / "edited")
    assert str(run / runs.CONFIG) in message and "hash to run id" in message


def test_a_changed_vocabulary_is_refused(trained_run, tmp_path, capsys):
    run = _copy_run(trained_run, tmp_path)
    Tokenizer(["[C]", "[N]"]).save(run / export.VOCAB)
    with pytest.raises(best.BestModelError, match="vocab.json: the vocabulary this run trained with differs"):
        best.load_best(run)
    assert f"{run / 'best.pt'}: not the ChemGPT weights" in _error(capsys, run, tmp_path / "out")


def test_the_run_keeps_its_vocabulary_and_the_corpus_it_trained_on(runs_root, tmp_path, capsys):
    """Items 1 and 8: a run on a user file saves vocab.json and the file's sha256 when it starts. Export
    reads vocab.json (the file may be gone); without it, a changed file is refused, not silently used."""
    lines = (Path(__file__).parent / "fixtures" / "moses_200.smi").read_text().splitlines()
    smi = tmp_path / "mine.smi"
    smi.write_text("\n".join(lines[:100]) + "\n")
    config = tiny_lm_config(max_steps=4, val_every_steps=2)
    config["data"] = {"source": str(smi), "n_train_molecules": 60, "n_val_molecules": 5, "n_test_molecules": 10}
    run = runs.create("t", config, runs_root)
    assert train.train(run)["status"] == "finished"
    _, train_corpus = best.load_best(run)
    trained_vocab = train_corpus.tokenizer
    assert Tokenizer.load(run / vocabulary.VOCAB) == trained_vocab
    import hashlib
    assert json.loads((run / vocabulary.CORPUS_RECORD).read_text())["sha256"] == hashlib.sha256(smi.read_bytes()).hexdigest()

    smi.write_text("\n".join(lines[100:]) + "\n")  # other molecules: other ids
    changed = corpus.load(str(smi), "train", 60, progress=False).tokenizer
    assert changed != trained_vocab
    with pytest.raises(ConfigError, match="vocabulary this run started with differs"):
        vocabulary.keep_vocabulary(run, changed, str(smi))  # what resuming the run would do
    assert best.load_best_model(run)[1] == trained_vocab  # vocab.json, not the changed file
    with pytest.raises(best.BestModelError, match="differs"):
        best.load_best(run)
    assert export.main([str(run), str(tmp_path / "ok")]) == 0
    assert json.loads((tmp_path / "ok" / "tokenizer.json").read_text())["model"]["vocab"] == trained_vocab.index
    without = _copy_run(run, tmp_path, leave_out=[vocabulary.VOCAB])
    message = _error(capsys, without, tmp_path / "out")
    assert f"{without / vocabulary.VOCAB}: missing" in message and "not the file the run trained on" in message
    assert not (without / vocabulary.VOCAB).exists() and not (tmp_path / "out").exists()
    older = _copy_run(run, tmp_path / "older", leave_out=[vocabulary.VOCAB, vocabulary.CORPUS_RECORD])  # a run from before both
    assert "records no fingerprint" in _error(capsys, older, tmp_path / "out")
    smi.unlink()
    assert export.main([str(run), str(tmp_path / "gone")]) == 0, "vocab.json suffices: no corpus needed"


def test_an_older_moses_run_without_vocab_json_still_exports(trained_run, tmp_path):
    """MOSES is package data, the same file for every run: its vocabulary can be rebuilt."""
    older = _copy_run(trained_run, tmp_path, leave_out=[vocabulary.VOCAB, vocabulary.CORPUS_RECORD])
    assert best.load_best_model(older)[1] == Tokenizer.load(trained_run / vocabulary.VOCAB)
    assert export.main([str(older), str(tmp_path / "out")]) == 0 and not (older / vocabulary.VOCAB).exists()
