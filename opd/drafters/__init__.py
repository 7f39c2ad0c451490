"""Drafters for speculative decoding: the interface (`base`), the kind registry (`registry`)
and the built-in kinds, each a plug-in in its own module: n-gram prompt lookup, an
independent small LM, EAGLE-3 and DFlash."""

from opd.drafters import registry
from opd.drafters.base import DraftContext, Drafter, DrafterSpec, LossOut, Segments, TargetFeatures
from opd.drafters.dflash import DFlashKind
from opd.drafters.eagle3 import Eagle3Kind
from opd.drafters.lm import LMKind
from opd.drafters.ngram import NGramKind
from opd.drafters.registry import DrafterKind, export_drafter, get_kind, init_drafter, load_drafter, register

for _kind in (NGramKind(), LMKind(), Eagle3Kind(), DFlashKind()):
    register(_kind)

__all__ = ["DraftContext", "Drafter", "DrafterKind", "DrafterSpec", "LossOut", "Segments", "TargetFeatures", "export_drafter",
           "get_kind", "init_drafter", "load_drafter", "register", "registry"]
