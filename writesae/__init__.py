"""WriteSAE: sparse autoencoders whose decoder atoms are rank-1 outer products u w^T."""

from writesae.activations import (
    ModelSource,
    ShardSource,
    TensorSource,
    WriteFactors,
    extract_cell,
    extract_cells,
    save_shards,
)
from writesae.config import TrainConfig, WriteSAEConfig, field_help
from writesae.corpus import Corpus
from writesae.dashboards import DashboardConfig, dashboard
from writesae.interventions import ablate_hook, install_hook, substitute_hook
from writesae.saes import SAE_KINDS, BaseSAE, FlatSAE, SAEOutput, WriteSAE, load_sae
from writesae.sweep import StackedSAE, save_sweep, sweep
from writesae.train import TrainingInterrupted, TrainMetrics, lr_at, train

__all__ = [
    "WriteSAEConfig",
    "TrainConfig",
    "field_help",
    "BaseSAE",
    "WriteSAE",
    "FlatSAE",
    "SAEOutput",
    "load_sae",
    "SAE_KINDS",
    "train",
    "TrainMetrics",
    "TrainingInterrupted",
    "lr_at",
    "WriteFactors",
    "TensorSource",
    "ModelSource",
    "ShardSource",
    "save_shards",
    "extract_cell",
    "extract_cells",
    "sweep",
    "save_sweep",
    "StackedSAE",
    "Corpus",
    "substitute_hook",
    "ablate_hook",
    "install_hook",
    "dashboard",
    "DashboardConfig",
]
