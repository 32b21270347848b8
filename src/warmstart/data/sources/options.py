"""How a data source is read, and what a source module provides."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceOptions:
    """How a data source is read (the run settings of the same names)."""

    crop_to_box: bool = False  # Stanford Dogs: the annotated dog box
    drop_empty_classes: bool = False  # leave out class folders without images
    allow_outside_paths: bool = False  # CSV manifests: paths outside the manifest's folder
    quiet: bool = False  # no download progress
    image_column: str | None = None  # Hugging Face datasets: the column of images, where not the obvious one
    label_column: str | None = None  # … and of labels

    @classmethod
    def of(cls, config) -> "SourceOptions":
        return cls(config.crop_to_box, config.drop_empty_classes, config.allow_outside_paths, config.quiet,
                   config.image_column, config.label_column)
