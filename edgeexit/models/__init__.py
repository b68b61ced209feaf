"""Multi-exit models (needs torch)."""

from .backbones import BACKBONES, Backbone, build_backbone
from .costs import Costs, count_macs
from .heads import CamHead, HeadOutput, exit_head, final_head
from .multiexit import SDN_FRACTIONS, MultiExitNet, build_model, exits_from_fractions, from_backbone, multi_exit

__all__ = [
    "BACKBONES", "Backbone", "build_backbone", "Costs", "count_macs", "CamHead", "HeadOutput", "exit_head",
    "final_head", "SDN_FRACTIONS", "MultiExitNet", "build_model", "exits_from_fractions", "from_backbone", "multi_exit",
]
