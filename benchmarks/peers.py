"""Peer segmenters for the realistic benchmark, run as a subprocess like the `segment` CLI.

    python benchmarks/peers.py METHOD IMAGE MASK OUT_DIR

METHOD is ``sklearn`` (scikit-learn ``GaussianMixture(3, covariance_type="full",
random_state=0)`` on the masked intensities), ``atropos`` (ANTsPy ``ants.atropos`` with k-means
initialisation, 3 classes, the mask, MRF ``[0.1,1x1x1]``, convergence ``[5,0]``: ANTsPy's
defaults with a 3-D neighbourhood) or ``n4-atropos`` (``ants.n4_bias_field_correction`` with the
mask at its defaults, then the same Atropos). Writes ``OUT_DIR/dseg.nii.gz`` (labels 1..3 by
ascending class mean, 0 outside the mask) and ``OUT_DIR/probseg.nii.gz`` ((X, Y, Z, 3) float32
posteriors in the same order). Needs the ``bench`` extra (scikit-learn, antspyx).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np

K = 3


def _write(labels, posteriors, reference, out_dir: Path) -> None:
    """Save (X, Y, Z) labels and (X, Y, Z, K) posteriors on the reference image's grid."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    nib.save(
        nib.Nifti1Image(labels.astype(np.uint8), reference.affine, header), out_dir / "dseg.nii.gz"
    )
    header = reference.header.copy()
    header.set_data_dtype(np.float32)
    nib.save(
        nib.Nifti1Image(posteriors.astype(np.float32), reference.affine, header),
        out_dir / "probseg.nii.gz",
    )


def _sorted_outputs(mask, class_means, posteriors_in_mask):
    """Labels and posterior volumes with classes reordered by ascending mean.

    Parameters
    ----------
    mask : (X, Y, Z) bool
    class_means : (K,) float
    posteriors_in_mask : (N, K) float, N = mask.sum()

    Returns
    -------
    labels : (X, Y, Z) uint8
    posteriors : (X, Y, Z, K) float32
    """
    order = np.argsort(class_means)
    post = posteriors_in_mask[:, order]
    labels = np.zeros(mask.shape, np.uint8)
    labels[mask] = post.argmax(axis=1) + 1
    volumes = np.zeros(mask.shape + (K,), np.float32)
    volumes[mask] = post
    return labels, volumes


def run_sklearn(image_path: Path, mask_path: Path, out_dir: Path) -> None:
    from sklearn.mixture import GaussianMixture

    img = nib.load(image_path)
    data = np.asarray(img.dataobj, dtype=np.float64)
    mask = np.asarray(nib.load(mask_path).dataobj) > 0
    x = data[mask].reshape(-1, 1)
    gmm = GaussianMixture(K, covariance_type="full", random_state=0).fit(x)
    labels, volumes = _sorted_outputs(mask, gmm.means_[:, 0], gmm.predict_proba(x))
    _write(labels, volumes, img, out_dir)


def run_atropos(image_path: Path, mask_path: Path, out_dir: Path, n4: bool) -> None:
    import ants

    image = ants.image_read(str(image_path))
    mask = ants.image_read(str(mask_path))
    mask = ants.threshold_image(mask, 0.5, 1e9)  # binary, float pixel type as Atropos expects
    if n4:
        image = ants.n4_bias_field_correction(image, mask=mask)
    result = ants.atropos(a=image, x=mask, i=f"kmeans[{K}]", m="[0.1,1x1x1]", c="[5,0]")
    seg = result["segmentation"].numpy().astype(int)
    inside = mask.numpy() > 0
    post = np.stack([p.numpy()[inside] for p in result["probabilityimages"]], axis=1)
    corrected = image.numpy()
    means = np.array([corrected[inside & (seg == k + 1)].mean() for k in range(K)])
    labels, volumes = _sorted_outputs(inside, means, post)
    _write(labels, volumes, nib.load(image_path), out_dir)


def main(argv: list[str]) -> int:
    method, image, mask, out_dir = argv
    if method == "sklearn":
        run_sklearn(Path(image), Path(mask), Path(out_dir))
    elif method in ("atropos", "n4-atropos"):
        run_atropos(Path(image), Path(mask), Path(out_dir), n4=method == "n4-atropos")
    else:
        raise SystemExit(f"unknown peer method {method!r}: sklearn, atropos or n4-atropos")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
