"""``wsi2dmamba models``: list the MIL models with their parameter counts."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models_command(
        in_dim: Annotated[int, typer.Option("--in-dim", min=1, help="Feature dimension the counts assume.")] = 1024,
        n_classes: Annotated[int, typer.Option("--n-classes", min=1, help="Classes the counts assume.")] = 2,
        presets: Annotated[bool, typer.Option("--presets", help="Also list every named preset (ablations, the "
                                                                "published configurations) as a model key.")] = False,
    ) -> None:
        """List every registered MIL model: model key, trainable parameters, description.

        A model key ``name:preset`` (e.g. ``2dmambamil:noscan``) is accepted wherever a model is named.
        """
        from ..models import create, list_models, model_info  # torch loads only for this command
        from ..models.registry import model_key

        typer.echo(f"{'model':<22} {'parameters':>11}  description  (in_dim {in_dim}, {n_classes} classes)")
        for name in list_models():
            info = model_info(name)
            names = list(info["presets"]) if presets else ["default"]
            for preset in names:
                model = create(name, in_dim=in_dim, n_classes=n_classes, preset=preset)
                typer.echo(f"{model_key(name, preset):<22} {model.num_parameters():>11,}  "
                           f"{info['presets'][preset]['description']}")
