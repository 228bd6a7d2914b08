"""Where a raster lies on the Earth: its CRS and its geotransform (pixel -> CRS coordinates)."""

from __future__ import annotations

from dataclasses import dataclass

from affine import Affine


@dataclass(frozen=True)
class Georef:
    """A raster's coordinate reference system (``EPSG:32633``, or WKT when it has no EPSG code) and the affine
    geotransform of its top-left pixel corner, as rasterio's ``Affine`` (a, b, c, d, e, f)."""

    crs: str
    transform: tuple[float, float, float, float, float, float]

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform)

    def bounds(self, height: int, width: int) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` in the CRS of a ``height`` x ``width`` raster with this georeference."""
        corners = [self.affine @ (x, y) for x in (0, width) for y in (0, height)]
        xs, ys = [c[0] for c in corners], [c[1] for c in corners]
        return min(xs), min(ys), max(xs), max(ys)

    def shifted(self, row: int, col: int) -> Georef:
        """The georeference of the sub-raster whose top-left pixel is (``row``, ``col``) of this one."""
        return Georef(self.crs, tuple(self.affine @ Affine.translation(col, row))[:6])

    @property
    def pixel_area(self) -> float:
        """The area of one pixel in the CRS's units squared."""
        return abs(self.affine.determinant)
