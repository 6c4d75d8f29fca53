from dsa_train.model.mla import ForwardMode
from dsa_train.model.transformer import CausalLM, ModelOutput, create_model

__all__ = ["CausalLM", "ForwardMode", "ModelOutput", "create_model"]
