"""Sampling from ChemGPT and the generation quality of a run (issue 8, item 32).

`ChemGPT.sample` is replayed token by token against the model's own forward pass, so a sample
that starts anywhere but after [BOS], runs past [EOS], drops or cleans a token, or draws from
other probabilities fails. `generation.generation_quality` is checked on a ChemGPT whose weights are
set by hand so that what it writes is known: a MOSES training molecule, one carbon more, or a
sequence holding [BOS]; the answer (2 distinct valid molecules, 1 of them novel) is known.
"""

import json

import pytest
import selfies as sf
import torch

from chemscale import runs
from chemscale.lm import corpus, generation, molecules
from chemscale.lm.chemgpt import ChemGPT, ChemGPTConfig
from chemscale.lm.tokenizer import BOS_ID, EOS_ID

V = 30  # vocabulary of the random models


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models sample fastest on one thread, and threads fighting over a busy CPU collapse (conftest restores)."""
    torch.set_num_threads(1)


def _random_model(seed=0, n_positions=64):
    torch.manual_seed(seed)
    return ChemGPT(ChemGPTConfig(vocab_size=V, width=32, depth=2, n_heads=2, n_positions=n_positions)).eval()


def _replay(model, n, max_len, seed, temperature=1.0):
    """Reference sampler: the full forward pass at every step, [BOS] first, cut at the first [EOS]."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((n, 1), BOS_ID)
    with torch.no_grad():
        for _ in range(max_len - 1):
            probs = torch.softmax(model(ids)[0][:, -1] / temperature, -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], 1)
    rows = ids[:, 1:].tolist()
    return [row[: row.index(EOS_ID)] if EOS_ID in row else row for row in rows]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_samples_replay_token_by_token(temperature):
    model = _random_model()
    ours = model.sample(40, max_len=40, temperature=temperature, generator=torch.Generator().manual_seed(3))
    assert ours == _replay(model, 40, 40, seed=3, temperature=temperature)
    ended = [s for s in ours if len(s) < 39]
    assert ended and len(ended) < 40, "the check needs samples stopped by [EOS] and samples cut at max_len"
    assert all(EOS_ID not in s and len(s) <= 39 for s in ours)
    specials = {t for s in ours for t in s if t < 4}
    assert specials, "an untrained model draws [PAD]/[BOS]/[UNK]: they must stay in the sample, not be cleaned"


def test_sample_is_reproducible_with_a_seed():
    model = _random_model()

    def draw(seed, **kw):
        return model.sample(20, max_len=30, generator=torch.Generator().manual_seed(seed), **kw)

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_greedy_equals_top1_and_stops_at_eos():
    model = _random_model(seed=2)
    greedy = model.sample(3, max_len=64, temperature=0)
    assert greedy == model.sample(3, max_len=64, top_k=1, generator=torch.Generator().manual_seed(0))
    assert greedy == _replay(model, 3, 64, seed=0, temperature=1e-4)


# --- generation quality on a model whose output is known ---------------------------------------

# The first training molecule along MOSES's fixed permutation whose stored SMILES is not RDKit's
# canonical form (position 5,831): novelty must canonicalise the training set to see it.
NON_CANONICAL = "[H]N=c1n(CCO)c2ccccc2n1Cc1ccc(C(C)(C)C)cc1"
N_TRAIN = 5832


def _config():
    return {"study": "gen", "task": "chemgpt", "seed": 0,
            "model": {"width": 64, "depth": 1, "n_heads": 4, "n_positions": 128},
            "data": {"source": "moses", "n_train_molecules": N_TRAIN, "n_val_molecules": 64},
            "train": {"batch_size": 16, "max_steps": 1, "accelerator": "cpu"}}


def _scripted_state(n_vocab, script, width=64, n_positions=128):
    """Weights of a ChemGPT whose next token at position t is drawn uniformly from `script[t]`.

    The blocks add nothing (zero projections), so the last hidden state is token + position
    embedding; each position's embedding points at its allowed tokens, a hundred times the token
    embedding, and the tied output layer then gives those tokens equal logits ~45 above the rest.
    """
    model = ChemGPT(ChemGPTConfig(vocab_size=n_vocab, width=width, depth=1, n_heads=4, n_positions=n_positions))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.wte.weight[:, :n_vocab] = torch.eye(n_vocab)
        model.ln_f.weight.fill_(10.0)
        for t in range(n_positions):
            model.wpe.weight[t, script[t] if t < len(script) else [EOS_ID]] = 100.0
    return model.state_dict()


@pytest.fixture(scope="module")
def known_run(tmp_path_factory):
    """A run folder whose best.pt writes NON_CANONICAL, it plus one atom, or it plus [BOS]."""
    run_dir = runs.create("gen", _config(), tmp_path_factory.mktemp("runs"))
    train = corpus.load("moses", "train", N_TRAIN, seed=0, progress=False)
    assert train.smiles()[N_TRAIN - 1] == NON_CANONICAL != molecules.canonical(NON_CANONICAL)
    tok = train.tokenizer
    symbols = list(sf.split_selfies(sf.encoder(NON_CANONICAL)))
    extra = next(s for s in ("[C]", "[N]") if s != symbols[-1])
    script = [[tok.index[s]] for s in symbols] + [[EOS_ID, BOS_ID, tok.index[extra]]]
    torch.save(_scripted_state(len(tok), script), run_dir / "best.pt")
    longer = molecules.canonical(sf.decoder("".join(symbols) + extra))
    training_set = {molecules.canonical(s) for s in train.smiles()}
    assert longer not in training_set and molecules.canonical(NON_CANONICAL) in training_set
    return run_dir, molecules.canonical(NON_CANONICAL), longer


def test_generation_quality_known_answer(known_run):
    run_dir, in_training, novel = known_run
    q = generation.generation_quality(run_dir, n_samples=60, seed=0)
    lines = (run_dir / "samples_60_0.smi").read_text().splitlines()
    assert len(lines) == 60 and {molecules.canonical(s) for s in lines} == {in_training, novel, None}
    n_bos = lines.count("")  # the samples that wrote [BOS] before [EOS]: invalid, not cleaned into a molecule
    assert 10 <= n_bos <= 30
    assert q == {"n": 60, "n_valid": 60 - n_bos, "n_unique": 2, "n_novel": 1, "validity": pytest.approx(1 - n_bos / 60),
                 "uniqueness": pytest.approx(2 / (60 - n_bos)), "novelty": 0.5}


def test_generation_quality_cache_is_reused_until_the_weights_change(known_run, monkeypatch):
    run_dir, _, _ = known_run
    first = generation.generation_quality(run_dir, n_samples=30, seed=1)
    with monkeypatch.context() as m:
        m.setattr(generation, "load_best", lambda *a: pytest.fail("sampled again although the cache was valid"))
        assert generation.generation_quality(run_dir, n_samples=30, seed=1) == first
    cached = json.loads((run_dir / "samples_30_1.json").read_text())
    assert cached.pop("best_pt_sha256") and cached == first

    saved = (run_dir / "best.pt").read_bytes()
    state = torch.load(run_dir / "best.pt", weights_only=True)
    state["wpe.weight"][0] = 0  # another first symbol: another molecule
    state["wpe.weight"][0, 5] = 100.0
    try:
        torch.save(state, run_dir / "best.pt")
        retrained = generation.generation_quality(run_dir, n_samples=30, seed=1)
    finally:
        (run_dir / "best.pt").write_bytes(saved)
    assert retrained != first, "a stale cache was returned for new weights"
    assert generation.generation_quality(run_dir, n_samples=30, seed=1) == first, "same weights and seed, same samples"
