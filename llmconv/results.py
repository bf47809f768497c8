"""What llmconv's public API returns (api.py): one dataclass per command, holding the plans and
what was written, with the command's `--json` report (`report()`) and text where it prints one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ConvertResult:
    """One plan (pipeline.Conversion) per output type and, unless it was a dry run, the file(s)
    written for it (execute.WriteResult), in the same order."""

    conversions: list
    written: list = field(default_factory=list)
    dry_run: bool = False

    @property
    def paths(self) -> list[Path]:
        return [p for w in self.written for p in w.paths]

    def report(self) -> dict:
        """The `--json` report: one output's, or {"dry_run", "outputs": [...]} for several."""
        from .convert.pipeline import plan_json

        if self.dry_run:
            outs = [plan_json(c) for c in self.conversions]
            return {"dry_run": True, **outs[0]} if len(outs) == 1 else {"dry_run": True, "outputs": outs}
        outs = [
            {"dry_run": False, **plan_json(c), "seconds": w.seconds, "file_bytes": w.nbytes}
            for c, w in zip(self.conversions, self.written)
        ]
        return outs[0] if len(outs) == 1 else {"dry_run": False, "outputs": outs}

    def describe(self) -> str:
        """The plan as text (`--dry-run`)."""
        from .convert.pipeline import describe_plan

        return "\n\n".join(describe_plan(c) for c in self.conversions)


@dataclass
class QuantizeResult:
    """One plan (pipeline.Requantization) per output type and the file(s) written for it."""

    src: Path
    requantizations: list
    written: list

    @property
    def paths(self) -> list[Path]:
        return [p for w in self.written for p in w.paths]

    def report(self) -> dict:
        reports = [
            {
                "input": str(self.src),
                "output": str(w.path),
                "type": rq.plan.outtype,
                "file_type": rq.plan.file_type,
                "seconds": w.seconds,
                "file_bytes": w.nbytes,
                "tensors": [
                    {
                        "name": t.name,
                        "type": t.qtype.name,
                        "shape": list(t.shape),
                        "bytes": t.nbytes,
                        "reason": t.reason,
                    }
                    for t in rq.plan.tensors
                ],
                "notes": rq.plan.notes,
                "warnings": rq.warnings,
            }
            for rq, w in zip(self.requantizations, self.written)
        ]
        return reports[0] if len(reports) == 1 else {"outputs": reports}


@dataclass
class ConvertLoraResult:
    adapter: Path
    base: Path
    conversion: Any  # lora_out.AdapterConversion
    written: Any  # execute.WriteResult

    @property
    def paths(self) -> list[Path]:
        return list(self.written.paths)

    def report(self) -> dict:
        ac, w = self.conversion, self.written
        return {
            "adapter": str(self.adapter),
            "base": str(self.base),
            "output": str(w.path),
            "type": ac.plan.outtype,
            "alpha": ac.alpha,
            "rslora": ac.adapter.rslora,
            "tensors": [{"name": t.name, "type": t.qtype.name, "shape": list(t.shape)} for t in ac.plan.tensors],
            "seconds": w.seconds,
            "file_bytes": w.nbytes,
        }


@dataclass
class VerifyResult:
    report: dict  # schema: verify/report.py

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])

    def text(self) -> str:
        from .verify.run import format_report

        return format_report(self.report)


@dataclass
class InspectResult:
    summary: dict  # header, metadata, tensors, totals (the `--json` document)

    def text(self) -> str:
        from .formats.inspect_cmd import render_text

        return render_text(self.summary)


@dataclass
class ImatrixResult:
    path: Path
    imatrix: Any  # imatrix.Imatrix

    def report(self) -> dict:
        """The `--json` report."""
        im = self.imatrix
        return {
            "output": str(self.path),
            "matrices": len(im.entries),
            "chunks": im.chunk_count,
            "chunk_size": im.chunk_size,
            "datasets": list(im.datasets),
        }
