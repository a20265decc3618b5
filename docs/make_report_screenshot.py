"""A picture of a QC report page for the README (docs/images/qc_report.png).

    QT_QPA_PLATFORM=offscreen PYTHONPATH=. .venv/bin/python docs/make_report_screenshot.py [--run-dir DIR]

Fuses the bundled 3D sample (T1 reference, T2 moving with motion) with ``unifuse-3d-phantom``,
writes its outputs and ``report.html`` into ``--run-dir`` (a temporary folder by default) and
renders the page's top with Qt's rich-text engine (``QTextDocument``: no browser needed; the
page's embedded PNGs are handed over as document resources, since it does not read data URIs).
Qt's rich text follows only part of CSS, so the picture is plainer than a browser's.
"""

from __future__ import annotations

import argparse
import base64
import re
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from qtpy.QtCore import QByteArray, QRectF, QUrl
from qtpy.QtGui import QColor, QImage, QPainter, QTextDocument
from qtpy.QtWidgets import QApplication

from napari_unifuse.data.samples import SMALL_SAMPLE_SHAPE_3D, _sample_pair
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.outputs import write_fusion_outputs
from napari_unifuse.engine.report import write_report

OUT = Path(__file__).parent / "images" / "qc_report.png"
WIDTH, HEIGHT = 1000, 1900


def render(page: str, path: Path) -> None:
    document = QTextDocument()
    images: list[bytes] = []

    def as_resource(match: re.Match) -> str:
        images.append(base64.b64decode(match.group(1)))
        return f'src="figure{len(images) - 1}.png"'

    page = re.sub(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', as_resource, page)
    for index, data in enumerate(images):
        image = QImage()
        image.loadFromData(QByteArray(data), "PNG")
        document.addResource(QTextDocument.ImageResource, QUrl(f"figure{index}.png"), image.scaledToWidth(WIDTH - 40))
    document.setHtml(page)
    document.setTextWidth(WIDTH)
    picture = QImage(WIDTH, HEIGHT, QImage.Format_RGB32)
    picture.fill(QColor("white"))
    painter = QPainter(picture)
    document.drawContents(painter, QRectF(0, 0, WIDTH, HEIGHT))
    painter.end()
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    app = QApplication.instance() or QApplication([])  # noqa: F841 - QImage/QTextDocument need one
    pair = _sample_pair("t1-t2-motion", 3, SMALL_SAMPLE_SHAPE_3D)
    result = FusionEngine("unifuse-3d-phantom", device="cpu").run_fusion(pair.reference, pair.moving)
    with TemporaryDirectory() as scratch:
        run_dir = args.run_dir or Path(scratch) / "t1_t2_motion_3d"
        write_fusion_outputs(result, run_dir)
        report = write_report(result, run_dir, reference=pair.reference, moving=pair.moving)
        render(report.read_text(encoding="utf-8"), OUT)
    print(f"{report} rendered to {OUT}")


if __name__ == "__main__":
    main()
