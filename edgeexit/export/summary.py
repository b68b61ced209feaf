"""The table ``edgeexit export`` prints for a bundle (torch-free)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..runtime.bundle import Bundle

__all__ = ["bundle_rows", "print_bundle_table"]


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def bundle_rows(bundle: Bundle) -> List[Dict[str, Any]]:
    """One row per ONNX file: pipeline, file, exit, MACs, params, size (bytes), parity (kind -> max abs error)
    and engine."""
    rows = []
    for gate, pipe in bundle.pipelines.items():
        per_file: Dict[str, Dict[str, float]] = ((pipe.checks or {}).get("per_file") or {})
        for f in pipe.files():
            rows.append(_row(gate, f, per_file.get(f.file, {})))
    mono = ((bundle.checks or {}).get("monolithic") or {})
    rows.append(_row("-", bundle.monolithic, dict(mono)))
    return rows


def _row(gate: str, f: Any, parity: Dict[str, float]) -> Dict[str, Any]:
    return {"gate": gate, "file": f.file, "exit": None if f.exit < 0 else f.exit, "macs": f.macs, "params": f.params,
            "size": f.path.stat().st_size if f.path.is_file() else 0, "parity": dict(parity),
            "engine": None if f.engine is None else f"{f.engine.file} ({f.engine.precision})"}


def print_bundle_table(bundle: Bundle, console: Optional[Any] = None) -> None:
    """One row per file (the parity figures were printed by the export as it checked them)."""
    from rich.console import Console
    from rich.table import Table

    rows = bundle_rows(bundle)
    title = (f"bundle {bundle.path.name}: {bundle.num_classes} classes, gates {', '.join(bundle.pipelines)} "
             f"(default {bundle.default_gate})")
    table = Table(title=title, title_justify="left")
    for col in ("file", "exit", "MACs", "params", "size", "max |ORT-torch|"):
        table.add_column(col, justify="left" if col == "file" else "right", no_wrap=col == "file")
    with_engines = any(r["engine"] for r in rows)
    if with_engines:
        table.add_column("TensorRT engine")
    for r in rows:
        parity = f"{max(r['parity'].values()):.0e}" if r["parity"] else "-"
        cells = [r["file"], "-" if r["exit"] is None else str(r["exit"]), _human(r["macs"]), _human(r["params"]),
                 _mb(r["size"]), parity]
        if with_engines:
            cells.append(r["engine"] or "-")
        table.add_row(*cells)
    console = console or Console()
    console.print(table)
    for gate, pipe in bundle.pipelines.items():
        fractions = [m / bundle.reference_macs for m in bundle.exit_macs(gate)]
        console.print(f"{gate}: stages end at exits {', '.join(map(str, pipe.kept))}; leaving there costs "
                      f"{', '.join(f'{100 * c:.0f}%' for c in fractions)} of the plain network's "
                      f"{_human(bundle.reference_macs)} MACs")
