"""Text for calibration and evaluation: the user's text or jsonl files (or the built-in held-out
text), and transformers kept quiet while tokenizers and models load."""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

from .errors import SourceNotFoundError, UsageError


def load_text(paths: list[Path] | None, text_field: str = "text") -> tuple[str, str]:
    """(text, description): the tiny models' held-out text by default, else text or jsonl files."""
    if not paths:
        from .tiny_models import tiny_heldout_path

        return tiny_heldout_path().read_text(), "built-in held-out text of the tiny models (never used in training)"
    parts = []
    for path in paths:
        if not Path(path).is_file():
            raise SourceNotFoundError(f"{path}: no such data file")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
        except OSError as exc:
            raise SourceNotFoundError(f"{path}: cannot read ({exc.strerror})") from None
        if str(path).endswith(".jsonl"):
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        parts.append(json.loads(line)[text_field])
                    except (ValueError, KeyError, TypeError):
                        raise UsageError(f"{path}:{n}: not a JSON object with a {text_field!r} field") from None
        else:
            parts.append(text)
    return "\n\n".join(parts), ", ".join(Path(p).name for p in paths)  # names only: reports get published


@contextmanager
def quiet_transformers():
    """transformers' loading bars and config chatter, silenced: l4q prints its own progress."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # It warns that a checkpoint's own quantization_config wins; only `dequantize` is ours.
            warnings.filterwarnings("ignore", message=".*quantization_config.*", category=UserWarning)
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
