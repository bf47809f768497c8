"""`llmconv verify`: the command line over run.run_verify (the engine and its report schema)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import LlmconvError
from ..jsonout import emit_json, json_option


def _threads_default() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LlmconvError("no such file", file=path) from None
    except IsADirectoryError:
        raise LlmconvError("is a directory, expected a text file", file=path) from None
    except UnicodeDecodeError as e:
        raise LlmconvError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=path) from None
    except OSError as e:
        raise LlmconvError(f"cannot read: {e.strerror}", file=path) from None


@click.command(context_settings={"max_content_width": 100})
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--reference", "-r", "reference", required=True, type=click.Path(path_type=Path), metavar="CKPT_DIR",
              help="The original checkpoint the file was converted from: a Meta directory (params.json, "
                   "consolidated.NN.pth, tokenizer.model) or a Hugging Face one (config.json, safetensors, "
                   "tokenizer). BPE tokenizers need `pip install llmconv[bpe]`.")
@click.option("--text", "text_file", type=click.Path(path_type=Path), metavar="FILE",
              help="UTF-8 text to evaluate on. Default: a bundled English text (llmconv/verify/default_text.txt).")
@click.option("--tokens", "-n", type=int, default=256, show_default=True, metavar="N",
              help="Positions to evaluate: BOS plus the text's first N-1 tokens.")
@json_option("the full report (schema: llmconv/verify/run.py)")
@click.option("--max-kld", type=click.FloatRange(min=0), metavar="X",
              help="Fail if the mean KL divergence (reference || file) exceeds X nats. Default: by the file's type.")
@click.option("--min-top1", type=click.FloatRange(0, 1), metavar="X",
              help="Fail if fewer than this fraction of positions have the reference's top token. Default: by type.")
@click.option("--max-rel-dlogit", type=click.FloatRange(min=0), metavar="X",
              help="Fail if any |logit - reference logit| exceeds X times the reference's largest |logit|. "
                   "Default: by type.")
@click.option("--engine", type=click.Choice(["llama.cpp"]),
              help="Also run the file in llama.cpp (needs llama-cpp-python) and hold its logits to the same bounds.")
@click.option("--threads", "-t", type=click.IntRange(1, 256), default=_threads_default, show_default="all cores",
              metavar="N", help="Threads for --engine llama.cpp.")
@click.option("--activations", type=click.Choice(["ggml", "f32"]), default="ggml", show_default=True,
              help="ggml: round activations before each matmul as llama.cpp's CPU backend does (what users get); "
                   "f32: keep them float32 (the weights' error alone).")
@click.option("--checksums", "checksums", is_flag=False, flag_value="", default=None, metavar="[SIDECAR]",
              help="Also check every tensor's sha256 against the sidecar `convert --checksum` wrote "
                   "(default FILE.sha256.json).")
def verify(file, reference, text_file, tokens, json_path, max_kld, min_top1, max_rel_dlogit, engine, threads,
           activations, checksums):
    """Check a converted file against a reference forward pass over its original checkpoint.

    \b
    Runs the checkpoint in PyTorch float32 and the file in an independent numpy forward pass
    that reads only the file (its metadata, its tensors dequantized), on the same tokens, and
    compares the logits in llama-perplexity's terms: relative |dlogit|, KL divergence, top-1
    agreement and perplexity. It also checks the file's vocabulary and hyperparameters against
    the checkpoint, and every tensor, dequantized, against its source weight, so a failure
    names its cause where it can (a tensor, a metadata key, the vocabulary).

    \b
    Default bounds depend on the file's main quantization type (table and how they were
    calibrated: llmconv/verify/run.py). Exit status:
      0  every check within bounds
      1  out of bounds: the report lists each failure
      2  bad input (missing file, not a checkpoint, ...)

    \b
    Examples:
      llmconv verify Llama-2-7B-Q4_0.gguf --reference llama-2-7b/
      llmconv verify out.gguf -r ckpt/ --text some.txt --tokens 512 --json report.json
      llmconv verify out.gguf -r ckpt/ --max-kld 0.05 --min-top1 0.85      # CI gate
      llmconv verify out.gguf -r ckpt/ --engine llama.cpp                  # also run llama.cpp
      llmconv verify out.gguf -r ckpt/ --checksums                         # and the sha256 sidecar
    """
    from .run import format_report, run_verify

    text = read_text(text_file) if text_file is not None else None
    report = run_verify(file, reference, text=text, tokens=tokens, engine=engine, threads=threads,
                        activations=activations,
                        bounds={"max_kld": max_kld, "min_top1": min_top1, "max_rel_dlogit": max_rel_dlogit})
    if checksums is not None:
        from ..formats.checksums import check_sidecar

        problems = check_sidecar(file, checksums or None)
        report["checksums"] = {"checked": True, "problems": problems}
        report["failures"] += [f"checksum: {p}" for p in problems]
        report["passed"] = report["passed"] and not problems
    # with --json -, stdout carries only the JSON, so the table goes to stderr
    click.echo(format_report(report), err=json_path == "-")
    emit_json(json_path, report)
    if not report["passed"]:
        sys.exit(1)
