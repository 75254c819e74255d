"""A small convolutional net for images: the worked example of a model of one's own.

Adding a model takes three steps, and no change to the package:

1. Write an ordinary ``nn.Module``, batch-first, ``[B, *in_shape] -> [B, out_features]``, whose
   constructor takes ``in_shape`` and ``out_features`` and then its own keyword arguments, in a
   file of your own. It knows nothing of folds: the engine trains the K fold copies of it,
   stacked (``torch.func.vmap``) or one after another, whichever it measured faster.
2. Register it: ``@register_model("my-net")`` (``from project import register_model``), and name
   its module under the preset's ``imports`` (or ``--import``); or name it ``my_module:MyNet``.
3. Give it settings under ``models:`` in the task's preset (``args``, ``train`` and, for the sweep,
   a ``search`` space; ``experiments/configs/fashion-mnist.yaml`` has this model's) and choose it:
   ``--model my-net`` on ``train.py`` or ``sweep.py``.

GroupNorm, this model's default, stacks; BatchNorm's running statistics cannot, and such a model
trains its folds one after another (the engine says so). The Fashion-MNIST preset trains it with
two convolutions a block and BatchNorm, under bfloat16 autocast with channels-last weights: what
paid there on a CPU (docs/results.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from project.models.registry import register_model

NORMS = ("group", "batch")  # GroupNorm stacks; BatchNorm's running statistics train the folds one after another


@register_model("cnn")
class CNN(nn.Module):
    """Blocks of ``convs`` 3x3 convolutions, each with GroupNorm (``norm: batch``: BatchNorm) and
    ReLU, then 2x2 max-pooling; then a dropout-regularised two-layer classifier. ``channels`` gives
    one block per entry; each block halves the image."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_features: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.25,
        groups: int = 8,
        convs: int = 1,
        norm: str = "group",
    ) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(f"in_shape {tuple(in_shape)}: the CNN takes images, expected (channels, height, width)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout {dropout} is outside [0, 1)")
        if convs < 1:
            raise ValueError(f"convs {convs}: expected at least one convolution a block")
        if norm not in NORMS:
            raise ValueError(f"norm {norm!r}: expected one of {', '.join(NORMS)}")
        c_in, height, width = in_shape
        blocks: list[nn.Module] = []
        for c_out in channels:
            for _ in range(convs):
                normalise = nn.GroupNorm(min(groups, c_out), c_out) if norm == "group" else nn.BatchNorm2d(c_out)
                blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), normalise, nn.ReLU()]
                c_in = c_out
            blocks.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c_in * height * width, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_features),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
