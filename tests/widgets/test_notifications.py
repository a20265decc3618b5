"""What the workbench's notifications say when the file system refuses a write."""

from __future__ import annotations

import errno
import os

import pytest

from napari_unifuse._qt.notifications import report_error


@pytest.mark.parametrize(("code", "advice"), [(errno.ENOSPC, "free some space on its disk"),
                                              (errno.EROFS, "choose a folder on a disk that can be written to")])
def test_a_full_or_read_only_disk_is_one_line_naming_the_file_not_a_bug(code, advice, notifications):
    report_error(OSError(code, os.strerror(code), "/runs/cohort.csv"), "Export cohort")
    (message,) = [message for severity, message in notifications if severity == "error"]
    assert message.startswith(f"Export cohort: could not write /runs/cohort.csv ({os.strerror(code)}); {advice}")
    assert "unexpectedly" not in message and "report this" not in message and "\n" not in message


def test_an_oserror_the_user_cannot_fix_is_still_reported_as_a_bug(notifications):
    report_error(OSError(errno.EIO, "Input/output error", "/runs/cohort.csv"), "Export cohort")
    (message,) = [message for severity, message in notifications if severity == "error"]
    assert "failed unexpectedly" in message and "Please report this" in message
