"""cmx.pipelines: data loading and training code; no Ray or MLflow here.

Kept light on purpose: nothing is imported at package import (ffcv alone takes 4.4 s).
Data: `images` (ImageFolder scan, RGB conversion), `beton` (FFCV files), `loaders`
(`build_loader`), `fashion_mnist` (built-in dataset export).
"""
