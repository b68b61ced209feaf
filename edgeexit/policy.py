"""Exit policy: which gate, per-exit thresholds and orientations (numpy only, torch-free).

At internal exit i (0 <= i < E - 1) the raw gate score ``s = gates.gate_score(gate, signals, patience,
learned[i])`` is oriented by ``signs[i]`` (+1: higher means the exit is right, -1: lower means right) and the
sample leaves when ``signs[i] * s >= thresholds[i]``. The last exit always takes the sample. A threshold of
``+inf`` disables an exit; ``-inf`` makes it take every sample that reaches it (``override(max_exit=...)``).
Scores that are nan never pass a finite threshold (the sample goes on to the next exit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .gates import FEATURE_NAMES, GATE_NAMES, SIGNAL_NAMES, gate_score, kept_patience
from .stages import kept_exits, normalize_exits

__all__ = ["ExitPolicy"]

_LEARNED_KEYS = ("mean", "std", "weights", "bias")


def _float_list(name: str, values: Any) -> List[float]:
    """Floats from a list; ``None`` and the strings "inf" / "-inf" (non-strict JSON writers) are accepted."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a list of numbers, got {values!r}")
    out: List[float] = []
    for v in values:
        if v is None:
            out.append(math.inf)
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must contain numbers, got {v!r}") from exc
    return out


@dataclass
class ExitPolicy:
    """Per-exit gate configuration for E exits.

    - ``gate``: one of ``gates.GATE_NAMES``;
    - ``thresholds``: E - 1 floats, one per internal exit (``+inf`` = never leave there);
    - ``signs``: E - 1 orientations, each +1 or -1;
    - ``temperatures``: E softmax temperatures (> 0), used by the head graph when computing the signals;
    - ``learned``: None, or E - 1 ``fit_logistic`` param dicts over ``gates.FEATURE_NAMES`` (required when
      ``gate == "learned"``; kept when another gate is selected so that it can be switched back; None at exits
      that are not kept);
    - ``exits``: the kept internal exits (``edgeexit.stages``), sorted; None keeps all of them. An exit that is
      not kept has threshold ``+inf``. Patience, the coherence signals and the learned gate then refer to the
      previous *kept* exit, as the deployed chain computes them.
    """

    gate: str
    thresholds: List[float]
    signs: List[float]
    temperatures: List[float]
    learned: Optional[List[Optional[Dict[str, Any]]]] = None
    exits: Optional[List[int]] = None

    def __post_init__(self) -> None:
        self.thresholds = _float_list("thresholds", self.thresholds)
        self.signs = _float_list("signs", self.signs)
        self.temperatures = _float_list("temperatures", self.temperatures)
        if self.learned is not None:
            self.learned = [None if p is None else dict(p) for p in self.learned]
        if self.exits is not None:
            self.exits = list(normalize_exits(self.exits, len(self.temperatures)))
        self.validate()

    # -- validation ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError with a clear message when the policy is inconsistent."""
        if self.gate not in GATE_NAMES:
            raise ValueError(f"unknown gate {self.gate!r}; expected one of {', '.join(GATE_NAMES)}")
        e = len(self.temperatures)
        if e < 1:
            raise ValueError("temperatures must have one entry per exit (at least 1 exit)")
        for t in self.temperatures:
            if not (math.isfinite(t) and t > 0):
                raise ValueError(f"temperatures must be finite and > 0, got {self.temperatures}")
        if len(self.thresholds) != e - 1:
            raise ValueError(
                f"thresholds must have E - 1 = {e - 1} entries (one per internal exit), got {len(self.thresholds)}"
            )
        if any(math.isnan(t) for t in self.thresholds):
            raise ValueError(f"thresholds must not be nan, got {self.thresholds}")
        if len(self.signs) != e - 1:
            raise ValueError(f"signs must have E - 1 = {e - 1} entries, got {len(self.signs)}")
        if any(s not in (1.0, -1.0) for s in self.signs):
            raise ValueError(f"signs must be +1 or -1, got {self.signs}")
        if self.learned is not None:
            if len(self.learned) != e - 1:
                raise ValueError(f"learned must have E - 1 = {e - 1} param dicts, got {len(self.learned)}")
            d = len(FEATURE_NAMES)
            for i, p in enumerate(self.learned):
                if p is None:
                    if i in self.kept_internal:
                        raise ValueError(f"learned[{i}] is missing for kept exit {i}")
                    continue
                missing = [k for k in _LEARNED_KEYS if k not in p]
                if missing:
                    raise ValueError(f"learned[{i}] lacks {', '.join(missing)}")
                for k in ("mean", "std", "weights"):
                    if len(p[k]) != d:
                        raise ValueError(f"learned[{i}][{k!r}] must have {d} entries ({FEATURE_NAMES}), got {len(p[k])}")
        if self.gate == "learned" and self.learned is None and e > 1:
            raise ValueError("gate 'learned' needs learned params (one fit_logistic dict per internal exit)")
        dropped = [i for i in range(e - 1) if i not in self.kept_internal and self.thresholds[i] != math.inf]
        if dropped:
            raise ValueError(f"exit {dropped[0]} is not kept (exits {self.exits}) so its threshold must be inf")

    # -- construction -------------------------------------------------------------------------------------------
    @property
    def num_exits(self) -> int:
        """E, the number of exits (= len(temperatures))."""
        return len(self.temperatures)

    @property
    def kept_internal(self) -> tuple:
        """The kept internal exits (every internal exit when ``exits`` is None)."""
        return normalize_exits(self.exits, self.num_exits)

    @property
    def kept(self) -> tuple:
        """The kept internal exits and the last exit: where the deployed chain's stages end."""
        return kept_exits(self.exits, self.num_exits)

    @classmethod
    def default(
        cls,
        num_exits: int,
        gate: str = "max_prob",
        threshold: Union[float, Sequence[float]] = 0.9,
    ) -> "ExitPolicy":
        """An uncalibrated policy: the same ``threshold`` (or a list of E - 1) at every internal exit, all signs +1,
        all temperatures 1, no learned params (so ``gate="learned"`` is refused). Signs +1 mean "higher score
        leaves": for ``sal_entropy`` / ``sal_spread`` (where lower is probably surer) calibrate, or pass negative
        thresholds together with a policy whose signs are -1."""
        if int(num_exits) < 1:
            raise ValueError(f"num_exits must be >= 1, got {num_exits}")
        e = int(num_exits)
        return cls(
            gate=gate,
            thresholds=_broadcast_thresholds(threshold, e - 1),
            signs=[1.0] * (e - 1),
            temperatures=[1.0] * e,
            learned=None,
        )

    def override(
        self,
        gate: Optional[str] = None,
        thresholds: Optional[Union[float, Sequence[float]]] = None,
        max_exit: Optional[int] = None,
    ) -> "ExitPolicy":
        """A copy with CLI overrides applied (self is unchanged).

        - ``gate``: switch gates. The calibrated signs belong to the old gate, so for a different gate every sign
          is reset to +1 (higher score leaves; no per-gate exception) and new ``thresholds`` are required.
          Switching to ``"learned"`` needs learned params in the policy.
        - ``thresholds``: one float for every internal exit, or a list of E - 1.
        - ``max_exit``: exits after ``max_exit`` are not used: its threshold becomes ``-inf`` so every sample that
          reaches it leaves there (``max_exit = E - 1`` changes nothing).
        """
        e = self.num_exits
        new_gate = self.gate if gate is None else gate
        signs = list(self.signs)
        new_thr = list(self.thresholds)
        if new_gate not in GATE_NAMES:
            raise ValueError(f"unknown gate {new_gate!r}; expected one of {', '.join(GATE_NAMES)}")
        if new_gate != self.gate:
            signs = [1.0] * (e - 1)
            if thresholds is None and e > 1:
                raise ValueError(
                    f"switching the gate from {self.gate!r} to {new_gate!r} needs thresholds: "
                    f"the calibrated ones belong to {self.gate!r}"
                )
        if thresholds is not None:
            new_thr = _broadcast_thresholds(thresholds, e - 1)
        if max_exit is not None:
            m = int(max_exit)
            if not 0 <= m <= e - 1:
                raise ValueError(f"max_exit must be in [0, {e - 1}], got {max_exit}")
            if m < e - 1:
                if m not in self.kept_internal:
                    raise ValueError(f"exit {m} is not kept in this policy: choose one of "
                                     f"{', '.join(map(str, self.kept))}")
                new_thr[m] = -math.inf
        for i in range(e - 1):
            if i not in self.kept_internal:
                new_thr[i] = math.inf  # a dropped exit has no stage: nothing can leave there
        return replace(self, gate=new_gate, thresholds=new_thr, signs=signs)

    # -- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """JSON-able dict ``{gate, thresholds, signs, temperatures, learned}``. Non-finite thresholds stay floats
        (Python's ``json`` writes them as ``Infinity`` / ``-Infinity`` and reads them back)."""
        return {
            "gate": self.gate,
            "thresholds": [float(t) for t in self.thresholds],
            "signs": [float(s) for s in self.signs],
            "temperatures": [float(t) for t in self.temperatures],
            "learned": None
            if self.learned is None
            else [
                None if p is None else {
                    "mean": [float(v) for v in p["mean"]],
                    "std": [float(v) for v in p["std"]],
                    "weights": [float(v) for v in p["weights"]],
                    "bias": float(p["bias"]),
                }
                for p in self.learned
            ],
            "exits": None if self.exits is None else [int(k) for k in self.exits],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExitPolicy":
        """Inverse of ``to_dict``; raises ValueError on missing keys, wrong lengths or an unknown gate.
        Thresholds may also be ``null`` (= +inf) or the strings "inf" / "-inf"."""
        if not isinstance(data, Mapping):
            raise ValueError(f"an exit policy must be a dict, got {type(data).__name__}")
        missing = [k for k in ("gate", "thresholds", "signs", "temperatures") if k not in data]
        if missing:
            raise ValueError(f"exit policy lacks {', '.join(missing)}")
        learned = data.get("learned")
        if learned is not None and (isinstance(learned, (str, bytes, Mapping)) or not hasattr(learned, "__iter__")):
            raise ValueError("learned must be null or a list of param dicts")
        if learned is not None:
            learned = list(learned)
            for i, p in enumerate(learned):
                if p is not None and not isinstance(p, Mapping):
                    raise ValueError(f"learned[{i}] must be a dict or null")
        exits = data.get("exits")
        if exits is not None and (isinstance(exits, (str, bytes, Mapping)) or not hasattr(exits, "__iter__")):
            raise ValueError("exits must be null or a list of exit indices")
        return cls(
            gate=str(data["gate"]),
            thresholds=data["thresholds"],
            signs=data["signs"],
            temperatures=data["temperatures"],
            learned=learned,
            exits=None if exits is None else [int(k) for k in exits],
        )

    # -- decisions ----------------------------------------------------------------------------------------------
    def _check_internal(self, exit_index: int) -> int:
        i = int(exit_index)
        if not 0 <= i < self.num_exits - 1:
            raise ValueError(f"exit_index must be an internal exit in [0, {self.num_exits - 2}], got {exit_index}")
        return i

    def oriented_score(
        self, exit_index: int, signals: np.ndarray, patience: Optional[np.ndarray] = None
    ) -> np.ndarray:
        """``signs[i] * gate_score(gate, signals, patience, learned[i])``, float64 (B,), for internal exit i."""
        i = self._check_internal(exit_index)
        params = self.learned[i] if self.learned is not None else None
        return self.signs[i] * gate_score(self.gate, signals, patience, params)

    def raw_score(self, exit_index: int, signals: np.ndarray, patience: Optional[np.ndarray] = None) -> np.ndarray:
        """``gate_score(gate, signals, patience, learned[i])``, float64 (B,), for internal exit i (not oriented)."""
        i = self._check_internal(exit_index)
        params = self.learned[i] if self.learned is not None else None
        return gate_score(self.gate, signals, patience, params)

    def passes(self, exit_index: int, raw: np.ndarray) -> np.ndarray:
        """bool (B,): ``signs[i] * raw >= thresholds[i]`` for raw gate scores at exit i; always True at the last
        exit and where the threshold is ``-inf``; nan scores do not pass a finite threshold."""
        raw = np.asarray(raw)
        i = int(exit_index)
        if i == self.num_exits - 1:
            return np.ones(raw.shape[0], dtype=bool)
        i = self._check_internal(i)
        thr = self.thresholds[i]
        if thr == -math.inf:
            return np.ones(raw.shape[0], dtype=bool)
        if thr == math.inf:
            return np.zeros(raw.shape[0], dtype=bool)
        with np.errstate(invalid="ignore"):
            return np.asarray(self.signs[i] * raw >= thr)

    def should_exit(
        self, exit_index: int, signals: np.ndarray, patience: Optional[np.ndarray] = None
    ) -> np.ndarray:
        """bool (B,): whether each sample leaves at exit i: ``oriented_score >= thresholds[i]`` (see ``passes``)."""
        i = int(exit_index)
        if i == self.num_exits - 1:
            return np.ones(np.asarray(signals).shape[0], dtype=bool)
        return self.passes(i, self.raw_score(i, signals, patience))

    def decide(self, signals: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Offline simulation: the exit each sample leaves at, int64 (B,).

        ``signals`` (B, E, 7) are every exit's signals (the coherence signals against the previous *kept* exit),
        ``classes`` (B, E) every exit's predicted class (for patience over the kept exits, ``gates.patience_counts``).
        Exits that are not kept are skipped. A sample leaves at the first exit whose gate passes (the last exit
        if none does).
        """
        s = np.asarray(signals, dtype=np.float64)
        c = np.asarray(classes)
        e = self.num_exits
        if s.ndim != 3 or s.shape[1] != e or s.shape[2] != len(SIGNAL_NAMES):
            raise ValueError(f"signals must be (B, {e}, {len(SIGNAL_NAMES)}), got shape {s.shape}")
        if c.shape != s.shape[:2]:
            raise ValueError(f"classes must be (B, {e}), got shape {c.shape}")
        pat = kept_patience(c, self.kept)  # agreement between consecutive *kept* exits
        out = np.full(s.shape[0], e - 1, dtype=np.int64)
        undecided = np.ones(s.shape[0], dtype=bool)
        for i in self.kept_internal:
            if not undecided.any():
                break
            go = self.should_exit(i, s[:, i, :], pat[:, i]) & undecided
            out[go] = i
            undecided &= ~go
        return out


def _broadcast_thresholds(threshold: Union[float, Sequence[float], None], n: int) -> List[float]:
    if threshold is None:
        raise ValueError("threshold must be a number or a list")
    if isinstance(threshold, (int, float, np.floating, np.integer)):
        return [float(threshold)] * n
    values = _float_list("thresholds", threshold)
    if len(values) != n:
        raise ValueError(f"thresholds must have E - 1 = {n} entries, got {len(values)}")
    return values
