"""Classification heads: each adapter's own, run through the base architecture's transformers classification forward.

A PEFT SEQ_CLS adapter saves its head whole (modules_to_save): `score` on decoders and GPT-2, `classifier` on
BERT and RoBERTa, `pre_classifier` + `classifier` on DistilBERT. The body runs once for a whole batch, whatever
its rows' adapters; then each adapter's rows go through the architecture's own `*ForSequenceClassification`
forward, with the body replaced by its output for those rows and the adapter's head modules swapped in. So the
pooling is transformers' own (the last non-pad token on decoders, [CLS] + pooler on BERT, [CLS] + pre_classifier
on DistilBERT), never a copy of it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PretrainedConfig
from transformers.utils import ModelOutput


class _BodyOutput(nn.Module):
    """Stands in for the body inside the classification forward: returns what the body computed for these rows."""

    def __init__(self, output: ModelOutput):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs) -> ModelOutput:
        return self.output


def output_rows(output: ModelOutput, rows: slice) -> ModelOutput:
    """The body output of some rows of the batch (tensor fields only: a cache is not needed by a head)."""
    return type(output)(**{k: v[rows] for k, v in output.items() if isinstance(v, torch.Tensor)})


class SequenceClassifier:
    """The base's classification forward, with a head per adapter. Built on the meta device: it holds no weights
    of its own (the body is the served model's, the heads are the adapters')."""

    def __init__(self, config: PretrainedConfig, pad_token_id: int | None, base_heads: dict[str, nn.Module]):
        self.config = copy.deepcopy(config)
        self.config.pad_token_id = pad_token_id  # decoders pool the last token that is not padding
        self.config.problem_type = "single_label_classification"
        self._shells: dict[int, nn.Module] = {}  # templates by number of labels: read by build(), never changed
        # the forward's own shell: logits() swaps each adapter's head into it on the worker thread, so build(),
        # which runs in request threads, must never take it for a template (a 2-label adapter checked while a
        # 3-label head sat in it was refused as not fitting the base)
        self.shell = self._new_shell(2)
        self.prefix = self.shell.base_model_prefix
        self.architecture = type(self.shell).__name__
        self.head_names = [name for name, module in self.shell.named_children()
                           if name != self.prefix and any(True for _ in module.parameters())]
        # the head modules whose shapes follow the number of labels: every adapter must bring its own
        self.label_modules = {name for name in self.head_names
                              if _shapes(getattr(self._shell(2), name)) != _shapes(getattr(self._shell(3), name))}
        self.base_heads = base_heads  # head modules the base checkpoint trained (an encoder's pre_classifier)

    def _shell(self, n_labels: int) -> nn.Module:
        if n_labels not in self._shells:
            self._shells[n_labels] = self._new_shell(n_labels)
        return self._shells[n_labels]

    def _new_shell(self, n_labels: int) -> nn.Module:
        config = copy.deepcopy(self.config)
        config.num_labels = n_labels
        config.id2label = {i: f"LABEL_{i}" for i in range(n_labels)}
        config.label2id = {v: k for k, v in config.id2label.items()}
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config).eval()

    def build(self, saved: dict[str, torch.Tensor], n_labels: int, device: torch.device, dtype: torch.dtype
              ) -> tuple[dict[str, nn.Module], list[str]]:
        """An adapter's head modules from its saved tensors ({"classifier.weight": ..., ...}); and every problem."""
        problems: list[str] = []
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in saved.items():
            name, _, param = key.partition(".")
            if name in self.head_names:
                by_module.setdefault(name, {})[param] = tensor
            else:
                problems.append(f"tensor {key!r} is neither a LoRA A/B weight nor a classifier head of the base "
                                f"{self.architecture} (its head modules: {', '.join(self.head_names)})")
        template = self._shell(n_labels)
        heads: dict[str, nn.Module] = {}
        for name in self.head_names:
            if name not in by_module:
                if name in self.base_heads and name not in self.label_modules:
                    heads[name] = self.base_heads[name]
                else:
                    problems.append(f"the adapter has no {name!r} for the base {self.architecture}: save it with "
                                    f"modules_to_save={sorted(set(self.head_names) - set(self.base_heads))}")
                continue
            expected = _shapes(getattr(template, name))
            got = {param: tuple(t.shape) for param, t in by_module[name].items()}
            if got != expected:
                problems.append(f"{name}: the adapter's {_describe(got)} do not fit the base {self.architecture}'s "
                                f"{_describe(expected)} (a different base architecture or size?)")
                continue
            module = copy.deepcopy(getattr(template, name)).to_empty(device=device)
            module.load_state_dict(by_module[name])
            heads[name] = module.to(dtype).requires_grad_(False)
        return heads, problems

    def logits(self, ids: torch.Tensor, mask: torch.Tensor, output: ModelOutput, head: dict[str, nn.Module]
               ) -> torch.Tensor:
        """[rows, labels]: the classification forward over one adapter's rows, given their body output."""
        shell = self.shell
        kept = {name: shell._modules[name] for name in (self.prefix, *self.head_names)}
        try:
            shell._modules[self.prefix] = _BodyOutput(output)
            shell._modules.update(head)
            return shell(input_ids=ids, attention_mask=mask).logits
        finally:
            shell._modules.update(kept)


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {param: tuple(t.shape) for param, t in module.state_dict().items()}


def _describe(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{param} {list(shape)}" for param, shape in sorted(shapes.items()))
