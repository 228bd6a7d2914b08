"""Rasters as GIS tools know them: TIFF/GeoTIFF/COG read window by window, georeferenced masks, polygons.

- ``georef``: a raster's coordinate reference system and geotransform, and what follows from them;
- ``raster``: an input TIFF opened for windowed reads (bands, scaling, nodata), local or through fsspec;
- ``mask_files``: masks written row band by row band: a tiled COG with the source georeference, or a PNG;
- ``vectors``: masks as polygons per class, in GeoParquet.
"""
