"""hf:CLASS: Hugging Face transformers with several heads, random init, nothing downloaded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import routesurgeon as rs
from routesurgeon.errors import InputError, TracingError

transformers = pytest.importorskip("transformers")


def _train_and_export(spec: str, targets: dict[str, torch.Tensor], losses: dict) -> dict:
    built = rs.build_model(spec)
    s = rs.instrument(built.model, built.example_inputs)
    assert s.tasks == built.tasks
    assert s.shared_parameters()
    before = {k: v.detach().clone() for k, v in built.model.named_parameters()}
    opt = torch.optim.SGD(s.model_parameters(), lr=0.05)
    tr = rs.Trainer(s, opt, method="equal", progress=False)
    for _ in range(2):
        assert tr.train_step(built.example_inputs, targets, losses) is not None
    moved = [k for k, v in built.model.named_parameters() if not torch.equal(v, before[k])]
    assert moved
    s.eval()
    routes = s.export_routes(keep=1.0)
    with torch.no_grad():
        want = built.model(built.example_inputs)
        for t, route in routes.items():
            assert torch.allclose(route(*s.example_inputs()), want[t], atol=1e-4), t
    return {"surgeon": s, "routes": routes, "moved": moved}


def test_bert_for_pretraining_mlm_and_nsp_heads() -> None:
    mlm = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    out = _train_and_export(
        "hf:BertForPreTraining", {"mlm": mlm, "nsp": torch.tensor([0, 1])},
        {"mlm": lambda o, y: F.cross_entropy(o.flatten(0, 1), y.flatten()),
         "nsp": F.cross_entropy})
    s = out["surgeon"]
    assert s.tasks == ["mlm", "nsp"]
    tasks_of = s.param_tasks()
    assert tasks_of["model.bert.encoder.layer.0.attention.self.query.weight"] == {"mlm", "nsp"}
    assert tasks_of["model.cls.seq_relationship.weight"] == {"nsp"}
    assert "model.cls.seq_relationship.weight" in out["moved"]


def test_vit_model_with_two_heads() -> None:
    y = torch.tensor([2, 7])
    out = _train_and_export("hf:ViTModel", {"cls": y, "aux": y},
                            {"cls": F.cross_entropy, "aux": F.cross_entropy})
    assert out["surgeon"].tasks == ["cls", "aux"]
    assert out["surgeon"].trace_path.startswith("fx")


def test_raw_hf_model_error_says_what_to_wrap() -> None:
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32)
    model = transformers.BertForPreTraining(cfg).eval()
    with pytest.raises(TracingError, match=r"Hugging Face transformers model.*HFTasks"):
        rs.instrument(model, torch.randint(0, 64, (2, 8)))


def test_unknown_hf_class() -> None:
    with pytest.raises(InputError, match="transformers has no model class 'BertForPretraining'"):
        rs.build_model("hf:BertForPretraining")
