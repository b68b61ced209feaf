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


def bundle_rows(bundle: Bundle) -> List[Dict[str, Any]]:
    """One row per model file: file, MACs, params, size (bytes), parity (kind -> max abs error) and engine."""
    per_file: Dict[str, Dict[str, float]] = ((bundle.checks or {}).get("per_file") or {})
    rows = []
    for f in bundle.files():
        size = f.path.stat().st_size if f.path.is_file() else 0
        rows.append({
            "file": f.file, "macs": f.macs, "params": f.params, "size": size,
            "parity": dict(per_file.get(f.file, {})),
            "engine": None if f.engine is None else f"{f.engine.file} ({f.engine.precision})",
        })
    return rows


def print_bundle_table(bundle: Bundle, console: Optional[Any] = None) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = bundle_rows(bundle)
    checks = bundle.checks or {}
    title = f"bundle {bundle.path.name}: {bundle.num_exits} exits, {bundle.num_classes} classes, policy {bundle.policy.gate}"
    table = Table(title=title, title_justify="left")
    for col in ("file", "MACs", "params", "size", "max |ORT - torch|"):
        table.add_column(col, justify="left" if col in ("file", "max |ORT - torch|") else "right")
    with_engines = any(r["engine"] for r in rows)
    if with_engines:
        table.add_column("TensorRT engine")
    for r in rows:
        parity = ", ".join(f"{k} {v:.1e}" for k, v in r["parity"].items()) if r["parity"] else "not checked"
        cells = [r["file"], _human(r["macs"]), _human(r["params"]), _human(r["size"], "B"), parity]
        if with_engines:
            cells.append(r["engine"] or "-")
        table.add_row(*cells)
    console = console or Console()
    console.print(table)
    if checks:
        d = checks.get("decisions", {})
        worst = checks.get("max_abs_error", {})
        console.print(f"parity with torch on {checks.get('samples')} {checks.get('inputs')} inputs (tolerance "
                      f"{checks.get('tolerance')}), worst:", highlight=False)
        console.print("  " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()), highlight=False)
        console.print(f"chained decisions {d.get('equal')}/{d.get('compared')} equal to torch's "
                      f"({d.get('near_threshold')} near a threshold)", highlight=False)
    total = sum(r["size"] for r in rows)
    console.print(f"bundle {bundle.path}: {_human(total, 'B')} of model files; plain network "
                  f"{_human(bundle.reference_macs)} MACs", highlight=False)
    console.print(f"leaving at exit i costs {', '.join(f'{100 * c:.0f}%' for c in bundle.cumulative_fraction)} of it",
                  highlight=False)
