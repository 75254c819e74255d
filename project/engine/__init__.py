"""How the K fold models of a configuration train fast, behind the plain model a user writes:
member stacks (``stacking``, and the MLP's own in ``stacked_mlp``), stacked or sequential folds by
measurement (``layout``), chunks of mini-batches per Lightning step (``chunks``), fused optimisers
(``optim``), and the thin LightningModule (``module``) with its heads and metrics. Each trick has
a test that it gives the numbers of the plain way."""

from project.engine import stacked_mlp  # noqa: F401  (registers the MLP's hand-stacked form)
from project.engine.chunks import chunked
from project.engine.heads import ClassificationHead, RegressionHead
from project.engine.layout import FirstLayer, Layout, choose_first_layer, choose_layout
from project.engine.module import FoldModule
from project.engine.stacking import MemberStack, StackingError, build_stack, inference_stack

__all__ = [
    "ClassificationHead",
    "FirstLayer",
    "FoldModule",
    "Layout",
    "MemberStack",
    "RegressionHead",
    "StackingError",
    "build_stack",
    "choose_first_layer",
    "choose_layout",
    "chunked",
    "inference_stack",
]
