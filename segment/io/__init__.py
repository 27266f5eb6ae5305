"""Read scans and write segmentation outputs on the input grid.

One :class:`Scan` dataclass carries what the rest of the package needs from an input file: the
spatial data array, the voxel-to-world affine, the header and the voxel size.  NIfTI-1/-2 files
are read with nibabel (uncompressed ``.nii`` lazily, as a memory map); 2-D pictures (PNG, TIFF,
JPEG, BMP) with scikit-image / tifffile.

Outputs are written the way nilearn's ``new_img_like`` does: the header of the input is copied so
the grid (shape, affine, sform/qform and their codes, zooms, units) is kept, the data type is set
explicitly, stale scaling is reset and ``cal_min``/``cal_max`` describe the new data.  Every write
goes through :func:`atomic_write`, and gzip streams are written with ``mtime=0`` so identical
results give identical bytes.
"""

import os  # tests patch segment.io.os.replace / .access (the os module itself)

from segment.io.atomic import (
    TEMPORARY_NAME,
    StagedWrites,
    _temporary_path,
    _temporary_token,
    atomic_write,
    folder_lock,
    kill_point,
    pid_alive,
    remove_stale_temporaries,
)
from segment.io.gzip import (
    DEFAULT_COMPRESSLEVEL,
    STRATEGY_SAMPLES,
    _append_file,
    _gzip_member,
    _strategy,
    _write_members,
)
from segment.io.read import (
    DEFAULT_READ_LIMIT,
    MIN_READ_LIMIT,
    SUPPORTED_EXTENSIONS,
    Scan,
    _matched_extension,
    _nibabel_quiet,
    check_same_grid,
    is_supported,
    load_scan,
    read_nifti,
    scan_stem,
)
from segment.io.write import (
    SLAB_BYTES,
    slab_step,
    write_labels,
    write_map,
    write_map_slabs,
    write_nifti,
    write_nifti_slabs,
    write_nifti_volumes,
    write_probabilities,
)

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "Scan",
    "StagedWrites",
    "atomic_write",
    "check_same_grid",
    "is_supported",
    "load_scan",
    "read_nifti",
    "scan_stem",
    "write_labels",
    "write_nifti",
    "write_nifti_slabs",
    "write_nifti_volumes",
    "write_probabilities",
    "folder_lock",
    "remove_stale_temporaries",
]
