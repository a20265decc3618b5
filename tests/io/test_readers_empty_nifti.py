"""An empty NIfTI is described by the shape its header stores."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_unifuse.errors import InputError
from napari_unifuse.io import read_image


@pytest.mark.parametrize("shape", [(0, 32, 32), (32, 0, 32)])
def test_an_empty_nifti_is_reported_with_the_shape_its_header_stores(tmp_path, shape):
    """nibabel hands over (0,) for (0, 32, 32): the header's shape is what someone checking the file sees."""
    path = tmp_path / "empty.nii.gz"
    nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)).to_filename(path)
    with pytest.raises(InputError, match=rf"the image is empty \(array shape \({', '.join(map(str, shape))}\)\)"):
        read_image(path)
