"""A one-slice volume (a 2D image stored as 3D, e.g. one coronal slice) is flagged and described as
the image it is, as a 2D image is: not as "slice z = 11", one row of it."""

from __future__ import annotations

import pytest

from napari_unifuse.engine.annotations import Annotation, describe_location, slice_of_region
from napari_unifuse.errors import InputError

ONE_CORONAL_SLICE = (24, 1, 30)  # world z, y, x: one slice along y


@pytest.mark.parametrize(("slice_axis", "slice_index"), [(1, 0), (0, 11)])
def test_a_flag_on_a_one_slice_volume_is_about_the_image(slice_axis, slice_index):
    """(0, 11) is what earlier versions recorded when napari showed the volume one row per z step."""
    flag = Annotation(category="other", reviewer="a", slice_index=slice_index, slice_axis=slice_axis)
    region = Annotation(category="other", reviewer="a", slice_index=slice_index, slice_axis=slice_axis,
                        region_kind="shapes", region_world=[[[5.0, 0.0, 1.0]]])
    assert describe_location(flag, ONE_CORONAL_SLICE) == "image"
    assert describe_location(region, ONE_CORONAL_SLICE) == "region"


def test_a_slice_of_a_volume_is_still_named_by_its_axis():
    flag = Annotation(category="other", reviewer="a", slice_index=11, slice_axis=0)
    assert describe_location(flag, (24, 2, 30)) == "slice z = 11"


def test_a_region_on_a_one_slice_volume_lies_on_its_one_slice():
    """Drawn where napari shows one row per z step it is flat along z too: the image's plane is meant."""
    assert slice_of_region([[11, 0, 3], [11, 0.3, 20]], ONE_CORONAL_SLICE, viewed_axis=0) == (1, 0)
    assert slice_of_region([[2, 0, 3], [20, 0, 20], [20, 0, 3]], ONE_CORONAL_SLICE, viewed_axis=1) == (1, 0)


def test_a_region_off_the_one_slice_is_refused():
    with pytest.raises(InputError, match="lies outside the image"):
        slice_of_region([[11, -3, 3], [11, 4, 20]], ONE_CORONAL_SLICE, viewed_axis=0)
