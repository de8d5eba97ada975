"""The ChemGPT side: SELFIES language models of molecules, one concept per module.

| module       | concept                                                                     |
|--------------|-----------------------------------------------------------------------------|
| `read`       | SMILES files: layout (PubChem, .smi, .csv) and encoding from content; MOSES |
| `encode`     | SMILES -> SELFIES in worker processes (timeouts, crashes, a dying parent)   |
| `tokenizer`  | SELFIES symbols <-> token ids                                               |
| `corpus`     | encoded, cached, nested subsets of a source: `load`, `describe`, the CLI    |
| `chemgpt`    | the GPT-Neo-style model, HF-compatible                                      |
| `task`       | the training task `chemscale.train` runs: configs, module, loaders          |
| `best`       | what a run keeps: vocabulary, corpus record, best model                     |
| `generation` | validity / uniqueness / novelty of sampled molecules                        |

Importing this package is cheap: torch, RDKit and Lightning load with the modules that need them.
"""
