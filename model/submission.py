"""The shipped program's driver: what `train_gpt.py` (python -m model.run.shipped_code) runs, the scored
pipeline (model/pipeline.py) with its default hooks and nothing of the run machinery.

    python train_gpt.py                                 # one GPU (grad accumulation 8)
    torchrun --standalone --nproc_per_node=8 train_gpt.py
    SEED=42 ITERATIONS=20 PRESET=tiny DEVICE=cpu python train_gpt.py

Configuration as in the record's script: environment variables named like the fields of
model/run_config.py's Config and of GPTConfig in upper case (SEED, ITERATIONS, MAX_WALLCLOCK_SECONDS,
TTT_LR, QK_GAIN_INIT, ...) over the preset PRESET (default record); no range checks (those are
train.py's). Data: DATA_PATH, the folder of fineweb_{train,val}_*.bin (default
data/datasets/fineweb10B_sp<vocab>), and TOKENIZER_PATH (default
data/tokenizers/fineweb_<vocab>_bpe.model). The artifact goes to ARTIFACT_PATH (default
final_model.ptz); DEVICE is auto | cpu | cuda.
"""

from __future__ import annotations

import os
from pathlib import Path

from optim.distributed import setup_processes

from .data import DataPaths, read_run_data
from .pipeline import Hooks, Trainer, pin_attention, score, set_precision
from .run_config import model_config, overridden_config


def main(program: str) -> None:
    """The record's run; ``program``: the shipped file (its bytes are the code part of the cap)."""
    env = os.environ
    cfg = overridden_config(env.get("PRESET", "record"), env)[0]
    pd = setup_processes(env.get("DEVICE", "auto"))
    set_precision(pd.device)
    hooks = Hooks(pd.main)
    vocab = model_config(cfg, pd.device).vocab_size
    paths = DataPaths(
        Path(env.get("DATA_PATH", f"data/datasets/fineweb10B_sp{vocab}")),
        Path(env.get("TOKENIZER_PATH", f"data/tokenizers/fineweb_{vocab}_bpe.model")),
        vocab,
        "fineweb",
    )
    data = read_run_data(cfg, paths, vocab)
    trainer = Trainer(pin_attention(cfg, pd, hooks.log), pd, data, hooks)
    trainer.prime()
    trainer.train()
    score(trainer, Path(env.get("ARTIFACT_PATH", "final_model.ptz")), os.path.getsize(program))
    pd.close()
