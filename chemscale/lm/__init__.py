"""The ChemGPT side: SELFIES language models of molecules, one concept per module.

| module       | concept                                                                       |
|--------------|-------------------------------------------------------------------------------|
| `read`       | SMILES files: layout (PubChem, .smi, .csv) and encoding from content; MOSES   |
| `encode`     | SMILES -> SELFIES in worker processes (timeouts, crashes, a dying parent)     |
| `tokenizer`  | SELFIES symbols <-> token ids                                                 |
| `cache`      | the on-disk cache of encoded molecules: splits, manifest, locking, fill       |
| `corpus`     | nested subsets of a source as token ids: `load`, `describe`, the CLI          |
| `loader`     | batches of a corpus for training, validation, the benchmark and the tests     |
| `chemgpt`    | the GPT-Neo-style model, HF-compatible; `ChemGPTShape` = a run's `model`      |
| `task`       | the training task `chemscale.train` runs: data config, module, build          |
| `vocabulary` | what a run keeps: its vocabulary and the corpus file it trained on            |
| `best`       | a finished run's best model, with the vocabulary it trained with              |
| `molecules`  | validity, uniqueness and novelty of any molecules, SMILES or SELFIES (RDKit)  |
| `generation` | validity / uniqueness / novelty of a run's sampled molecules                  |
| `export`     | a trained run as a Hugging Face model folder: `python -m chemscale.lm.export` |
| `bench`      | ChemGPT training and data speed against baselines (`chemscale.bench chemgpt`) |

Importing this package is cheap: torch, RDKit and Lightning load with the modules that need them.
"""
