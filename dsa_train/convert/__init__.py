"""Hugging Face checkpoint import / export (DeepSeek-V3, V3.1, V3.2 <-> our model directories)."""

from dsa_train.convert.cli import convert_main
from dsa_train.convert.common import ConversionError
from dsa_train.convert.hf_config import hf_config_from_model_config, model_config_from_hf
from dsa_train.convert.hf_export import ExportReport, export_hf_checkpoint
from dsa_train.convert.hf_import import ImportReport, import_hf_checkpoint

__all__ = ["ConversionError", "ExportReport", "ImportReport", "convert_main", "export_hf_checkpoint",
           "hf_config_from_model_config", "import_hf_checkpoint", "model_config_from_hf"]
