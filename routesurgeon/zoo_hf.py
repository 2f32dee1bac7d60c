"""Hugging Face transformers models by class: ``hf:CLASS`` from a small config, random init.

Nothing is downloaded: the model is ``CLASS(CONFIG(**small))``. A transformers ``forward`` takes
``**kwargs`` and is wrapped by decorators (``can_return_tuple``, ``check_model_inputs``) that
``torch.fx`` cannot trace as the root; ``HFTasks`` is a thin root with explicit inputs that calls
the model with keyword arguments and returns the chosen output fields as ``{task: tensor}`` (the
model's own code is traced inside it). ``*ForPreTraining`` classes keep their own heads
(BERT: ``mlm`` and ``nsp``); a base ``*Model`` (``ViTModel``, ``ConvNextModel``) gets two linear
heads, ``cls`` and ``aux``, on its pooled output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from routesurgeon.errors import InputError

__all__ = ["HFTasks", "build_hf"]

_TEXT = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               image_size=32, patch_size=8)
_CONV = dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], image_size=32)
# field of the model output -> task name, per class family
_PRETRAINING = {"prediction_logits": "mlm", "seq_relationship_logits": "nsp"}


class HFTasks(nn.Module):
    """A transformers model as a multi-output root: ``forward(input)`` calls
    ``model(**{input_name: input})`` and returns ``{task: output.field}`` (``fields``: field ->
    task), then, when ``heads`` are given, ``{head: head(pooled)}`` on the pooled output."""

    def __init__(self, model: nn.Module, input_name: str, fields: Mapping[str, str] | None = None,
                 heads: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__()
        if not fields and not heads:
            raise InputError("HFTasks needs output fields or heads to make tasks of")
        self.model = model
        self.input_name = input_name
        self.fields = dict(fields or {})
        self.heads = nn.ModuleDict(dict(heads or {}))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: Any = self.model(**{self.input_name: x})
        tasks = {task: out[field] for field, task in self.fields.items()}
        if len(self.heads):
            pooled = out["pooler_output"]
            pooled = pooled.flatten(1) if pooled.dim() > 2 else pooled
            tasks.update({name: head(pooled) for name, head in self.heads.items()})
        return tasks


_SMALL = {  # config class name prefix -> small settings, for families the generic ones miss
    "ConvNext": _CONV,
    "Swin": dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], image_size=32, patch_size=4,
                 window_size=4),
    "ResNet": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
}


def _small_config(cls: type, config_cls: type) -> Any:
    name = config_cls.__name__
    for prefix, small in _SMALL.items():
        if name.startswith(prefix):
            return config_cls(**small)
    if getattr(cls, "main_input_name", "input_ids") == "pixel_values":
        return config_cls(**_VISION)
    return config_cls(**_TEXT)


def build_hf(class_name: str, num_classes: int = 10, **kwargs: Any) -> Any:
    """A ``BuiltModel`` for ``hf:CLASS`` (``kwargs`` override the small config)."""
    import transformers

    from routesurgeon.zoo import BuiltModel

    cls = getattr(transformers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise InputError(f"transformers has no model class {class_name!r} (e.g. "
                         f"hf:BertForPreTraining, hf:ViTModel, hf:ConvNextModel)")
    config_cls = getattr(cls, "config_class", None)
    if not isinstance(config_cls, type):
        raise InputError(f"hf:{class_name} has no config_class to build it from")
    config = _small_config(cls, config_cls)
    for k, v in kwargs.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    model = cls(config).eval()
    g = torch.Generator().manual_seed(0)
    vision = getattr(cls, "main_input_name", "input_ids") == "pixel_values"
    if vision:
        size = int(getattr(config, "image_size", 32))
        example = torch.randn(2, int(getattr(config, "num_channels", 3)), size, size, generator=g)
        input_name = "pixel_values"
    else:
        example = torch.randint(0, int(config.vocab_size), (2, 16), generator=g)
        input_name = "input_ids"
    if class_name.endswith("ForPreTraining") and hasattr(config, "type_vocab_size"):
        wrapped = HFTasks(model, input_name, fields=_PRETRAINING)
    elif class_name.endswith("Model"):
        with torch.no_grad():
            width = int(model(**{input_name: example})["pooler_output"].flatten(1).shape[1])
        heads = {n: nn.Linear(width, num_classes) for n in ("cls", "aux")}
        wrapped = HFTasks(model, input_name, heads=heads)
    else:
        raise NotImplementedError(
            f"hf:{class_name}: routesurgeon builds *ForPreTraining models with two heads "
            f"(e.g. hf:BertForPreTraining) and base *Model classes with two heads on the pooled "
            f"output (e.g. hf:ViTModel); for another class wrap it in "
            f"routesurgeon.zoo_hf.HFTasks(model, input_name, fields={{field: task}})")
    return BuiltModel(f"hf:{class_name}", wrapped.eval(), example, list(wrapped(example).keys()))
