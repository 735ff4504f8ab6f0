"""Screenshot an `l4q eval` report.html in headless Chromium with the network disabled.

    python scripts/screenshot_report.py REPORT_DIR [--out FILE] [--width 1280]

Saves a full-page PNG (default REPORT_DIR/report-screenshot.png). Chromium's --screenshot captures
the window, not the page, so the page is shot in a window taller than it can be and the blank
margin below the content is cropped off (doubling the window if the content reached its bottom).
Every request the page could make is blocked (proxy to a closed port, every host unresolvable),
so a screenshot that shows the plots proves the page is self-contained.

Needs Debian's chromium: `apt-get install -y chromium`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
MAX_HEIGHT = 32000


def chromium_screenshot(html: Path, out: Path, width: int, height: int, timeout: float = 180.0) -> None:
    """One window-sized screenshot of a local page, offline, in a fresh profile."""
    with tempfile.TemporaryDirectory(prefix="l4q-chromium-") as profile:
        cmd = [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={profile}",
            # Network off: every proxied request goes to a closed port, every host fails to resolve.
            "--proxy-server=127.0.0.1:9",
            "--proxy-bypass-list=<-loopback>",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--window-size={width},{height}",
            f"--screenshot={out}",
            html.resolve().as_uri(),
        ]
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        if result.returncode != 0 or not out.exists():
            tail = "\n".join(result.stdout.strip().splitlines()[-15:])
            raise RuntimeError(f"chromium exited with {result.returncode} and no screenshot:\n{tail}")


def content_height(png: Path, margin: int = 24) -> tuple[int, bool]:
    """(rows down to the last one that differs from the page background, plus a margin; whether the
    content reached the bottom edge of the shot)."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB"))
    background = img[-1, 0]
    rows = np.nonzero((img != background).any(axis=(1, 2)))[0]
    last = int(rows[-1]) + 1 if len(rows) else 0
    return min(last + margin, img.shape[0]), last >= img.shape[0] - 2


def screenshot_report(report_dir: Path, out: Path, width: int = 1280, height: int = 4000) -> Path:
    """A full-page screenshot of REPORT_DIR/report.html in `out`."""
    from PIL import Image

    html = report_dir / "report.html"
    if not html.is_file():
        raise FileNotFoundError(f"{html}: no report.html; run `l4q eval` (or llama4_quant.report.write_reports) first")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="l4q-shot-") as tmp:
        shot = Path(tmp) / "shot.png"
        while True:
            shot.unlink(missing_ok=True)
            chromium_screenshot(html, shot, width, height)
            used, cut_off = content_height(shot)
            if not cut_off or height >= MAX_HEIGHT:
                break
            height = min(2 * height, MAX_HEIGHT)
        img = Image.open(shot)
        img.crop((0, 0, img.width, used)).save(out, format="PNG")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report_dir", type=Path, help="a directory holding report.html")
    parser.add_argument("--out", type=Path, help="PNG to write (default REPORT_DIR/report-screenshot.png)")
    parser.add_argument("--width", type=int, default=1280, help="window width in CSS pixels (default 1280)")
    args = parser.parse_args(argv)
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        print(f"error: {CHROMIUM} not found; install it with `apt-get update && apt-get install -y chromium`",
              file=sys.stderr)
        return 2
    out = args.out or args.report_dir / "report-screenshot.png"
    try:
        path = screenshot_report(args.report_dir, out, width=args.width)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
