"""torchvision models by name: ``tv:NAME`` (random init, nothing downloaded).

* classification and video models become a backbone (the model with its last ``nn.Linear``
  replaced by ``nn.Identity``) shared by ``heads`` linear heads, like ``timm:NAME``; with
  ``aux=True``, GoogLeNet and Inception v3 keep their own auxiliary logits instead (outputs that
  exist only in training: the tasks are the training outputs, see
  ``routesurgeon.tracing.training_outputs``);
* segmentation models (DeepLabV3, FCN, LR-ASPP) return ``{"out", "aux"}`` with ``aux=True``
  (``aux_loss``; LR-ASPP has none);
* ``tv:NAME:features`` (classification models): torchvision's own
  ``create_feature_extractor`` over four stage outputs of the trunk (``{"stage1": ..}``, see
  ``feature_nodes``), the form people build multi-scale heads on;
* detection models: ``tv:NAME`` is the full model (its post-processing cannot be traced: the error
  says so), ``tv:NAME:heads`` the part training shares, backbone + FPN + heads (see
  ``routesurgeon.detection``).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from routesurgeon.errors import InputError

__all__ = ["AUX_MODELS", "build_tv", "feature_nodes", "tv_population"]

AUX_MODELS = ("googlenet", "inception_v3")  # classification models with their own aux logits
_VIDEO_SIZE = (4, 64, 64)  # frames, height, width
_MIN_SIZE = {"inception_v3": 299, "googlenet": 64}  # the aux heads need these sizes
_SEG_AUX = ("deeplabv3_", "fcn_")


def tv_population() -> dict[str, list[str]]:
    """torchvision's model names by population (optical flow and quantized models excluded)."""
    import torchvision.models as tvm

    return {
        "classification": sorted(tvm.list_models(module=tvm)),
        "segmentation": sorted(tvm.list_models(module=tvm.segmentation)),
        "video": sorted(tvm.list_models(module=tvm.video)),
        "detection": sorted(tvm.list_models(module=tvm.detection)),
    }


def _population_of(name: str) -> str:
    for pop, names in tv_population().items():
        if name in names:
            return pop
    import torchvision.models as tvm

    close = [n for n in tvm.list_models() if name[:4] in n][:8]
    raise InputError(f"torchvision has no model {name!r} (classification, segmentation, video or "
                     f"detection)" + (f"; close: {close}" if close else ""))


class _Heads(nn.Module):
    """A torchvision backbone (its classifier removed) shared by linear heads: ``{head: out}``."""

    def __init__(self, backbone: nn.Module, width: int, names: list[str], classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict({n: nn.Linear(width, classes) for n in names})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.backbone(x)
        return {name: head(z) for name, head in self.heads.items()}


def _strip_classifier(model: nn.Module, classes: int) -> tuple[nn.Module, int]:
    """``model`` with its last ``nn.Linear`` replaced by ``nn.Identity``, and that layer's input
    width; models whose classifier is a conv (SqueezeNet, S3D) keep it: the heads take its
    class scores."""
    last = None
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = path
    if last is None:  # a conv classifier (SqueezeNet, S3D): the heads take its class scores
        return model, classes
    parent_path, _, attr = last.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    linear = parent.get_submodule(attr)
    assert isinstance(linear, nn.Linear)
    setattr(parent, attr, nn.Identity())
    return model, linear.in_features


_HEAD_NAMES = ("avgpool", "classifier", "fc", "head", "heads", "dropout", "flatten", "norm",
               "pre_logits", "ln", "global_pool")


def _trunk_stages(model: nn.Module) -> tuple[str, list[str]]:
    """Module paths of the trunk's stages: the children of the deepest container holding most of
    the parameters (``features`` of MobileNet/EfficientNet/ConvNeXt, ``encoder.layers`` of a ViT),
    or the model's own children (ResNet's ``layer1``..``layer4``), heads and pooling left out;
    and that container's path prefix. Only children with parameters are stages."""
    prefix, container = "", model
    while True:
        kids = [(n, m) for n, m in container.named_children() if n not in _HEAD_NAMES]
        size = {n: sum(p.numel() for p in m.parameters()) for n, m in kids}
        big = [(n, m) for n, m in kids if size[n] > 0.8 * (sum(size.values()) or 1)]
        if len(big) == 1 and len(list(big[0][1].children())) >= 2:
            prefix, container = f"{prefix}{big[0][0]}.", big[0][1]
            continue
        return prefix, [f"{prefix}{n}" for n, m in kids if size[n]]


def feature_nodes(model: nn.Module, stages: int = 4) -> tuple[dict[str, str], dict[str, str]]:
    """``create_feature_extractor`` return nodes (train, eval) for ``stages`` trunk stages (the
    last ones of a short trunk, else evenly spaced): the last graph node inside each stage's
    module, as ``{node: "stageK"}``."""
    from torchvision.models.feature_extraction import get_graph_node_names

    prefix, paths = _trunk_stages(model)
    if len(paths) < stages:
        raise InputError(f"{type(model).__name__}'s trunk has {len(paths)} stages "
                         f"({paths}); ask for at most that many")
    n = len(paths)  # a short trunk (ResNet's conv1, bn1, layer1..4): its last stages
    picks = (list(range(n - stages, n)) if n <= 2 * stages
             else [round((k + 1) * n / stages) - 1 for k in range(stages)])

    def inside(x: str, path: str) -> bool:
        return x == path or x.startswith(path + ".")

    def in_trunk(x: str) -> bool:
        return x.startswith(prefix) and x[len(prefix):].split(".")[0] not in _HEAD_NAMES

    out = []
    for names in get_graph_node_names(model):
        nodes = {}
        for k, j in enumerate(picks):
            # a stage ends where the next stage with parameters starts, so the parameter-free
            # modules after it (VGG's ReLU(inplace=True) and pooling) belong to it: the node
            # returned is never one that a later in-place op mutates
            start = next((i for i, x in enumerate(names) if inside(x, paths[j])), None)
            if start is None:
                raise InputError(f"no graph node of {type(model).__name__} lies in "
                                 f"{paths[j]!r}")
            end = next((i for i, x in enumerate(names) if j + 1 < n and inside(x, paths[j + 1])),
                       len(names))
            last = [x for x in names[start:end] if in_trunk(x)][-1]
            nodes[last] = f"stage{k + 1}"
        out.append(nodes)
    return out[0], out[1]


def _example(pop: str, name: str, size: int | tuple[int, int] | None, batch: int = 2) -> Any:
    g = torch.Generator().manual_seed(0)
    if pop == "video":
        t, h, w = _VIDEO_SIZE
        if size is not None:
            h, w = (size, size) if isinstance(size, int) else size
        if name.startswith(("mvit", "s3d")):  # fixed sizes (S3D's 2x7x7 average pool)
            t, h, w = 16, 224, 224
        return torch.randn(batch, 3, t, h, w, generator=g)
    default = 224 if name.startswith(("vit_", "swin", "maxvit")) else _MIN_SIZE.get(name, 64)
    if pop == "detection":
        default = 128
    h, w = (size, size) if isinstance(size, int) else (size or (default, default))
    return torch.randn(batch, 3, h, w, generator=g)


def build_tv(name: str, part: str = "", aux: bool = False, heads: int = 3, num_classes: int = 10,
             input_size: int | tuple[int, int] | None = None, **kwargs: Any) -> Any:
    """A ``BuiltModel`` for ``tv:NAME`` (``part="heads"``: a detection model's shared part)."""
    import torchvision.models as tvm

    from routesurgeon.zoo import BuiltModel

    pop = _population_of(name)
    if part == "features" and pop == "classification":
        from torchvision.models.feature_extraction import create_feature_extractor

        if aux:
            raise InputError(f"tv:{name}:features has no auxiliary outputs; drop --aux")
        extra = {"aux_logits": False, "init_weights": False} if name in AUX_MODELS else {}
        model = tvm.get_model(name, weights=None, num_classes=num_classes, **extra, **kwargs)
        train_nodes, eval_nodes = feature_nodes(model.eval())
        fx_model = create_feature_extractor(model, train_return_nodes=train_nodes,
                                            eval_return_nodes=eval_nodes)
        return BuiltModel(f"tv:{name}:features", fx_model.eval(),
                          _example(pop, name, input_size), sorted(set(eval_nodes.values())))
    if part and (pop != "detection" or part != "heads"):
        raise InputError(f"tv:{name}:{part}: the parts are 'features' (classification models: "
                         f"create_feature_extractor over four stages, e.g. tv:resnet18:features)"
                         f" and 'heads' (detection models: backbone + FPN + heads, e.g. "
                         f"tv:retinanet_resnet50_fpn:heads)")
    if pop == "detection":
        from routesurgeon.detection import detection_heads

        ssd = name.startswith("ssd")  # SSD's transform has a fixed size (300 or 320)
        size = input_size or 128
        if ssd and input_size is None:
            size = 300 if name.startswith("ssd300") else 320
        hw = (size, size) if isinstance(size, int) else size
        sizes = {} if ssd else {"min_size": min(hw), "max_size": max(hw)}
        model = tvm.get_model(name, weights=None, weights_backbone=None,
                              num_classes=num_classes, **sizes, **kwargs).eval()
        if part:
            shared = detection_heads(model)
            return BuiltModel(f"tv:{name}:heads", shared.eval(), _example(pop, name, hw),
                              list(shared.tasks))
        images = [x for x in _example(pop, name, hw)]
        return BuiltModel(f"tv:{name}", model, cast(Any, (images,)), None)
    if pop == "segmentation":
        has_aux = name.startswith(_SEG_AUX)
        if aux and not has_aux:
            raise InputError(f"tv:{name} has no auxiliary head (aux_loss); drop --aux")
        extra = {"aux_loss": True} if aux else {}
        model = tvm.get_model(name, weights=None, weights_backbone=None,
                              num_classes=num_classes, **extra, **kwargs)
        tasks = ["out", "aux"] if aux else ["out"]
        return BuiltModel(f"tv:{name}", model.eval(), _example(pop, name, input_size), tasks)
    if name in AUX_MODELS:
        extra = {"aux_logits": aux, "init_weights": False}
    elif aux:
        raise InputError(f"tv:{name} has no auxiliary outputs; --aux is for {list(AUX_MODELS)} "
                         f"and DeepLabV3/FCN segmentation models")
    else:
        extra = {}
    model = tvm.get_model(name, weights=None, num_classes=num_classes, **extra, **kwargs)
    example = _example(pop, name, input_size)
    if aux:  # the model's own outputs (its train-mode namedtuple's fields): logits and aux logits
        outputs = tvm.GoogLeNetOutputs if name == "googlenet" else tvm.InceptionOutputs
        return BuiltModel(f"tv:{name}", model.eval(), example, list(outputs._fields))
    backbone, width = _strip_classifier(model, num_classes)
    names = ["cls", "aux", *(f"head{i}" for i in range(2, heads))][:heads]
    return BuiltModel(f"tv:{name}", _Heads(backbone, width, names, num_classes).eval(), example,
                      names)
