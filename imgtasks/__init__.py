"""imgtasks: download image URLs concurrently and make thumbnails, on a laptop or a Dask cluster."""

__version__ = "0.1.0"
