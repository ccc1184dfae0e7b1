import json


def test_tiny_run_writes_export_and_grid(tiny_run):
    export = tiny_run["export"]
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_user_ldm", "UserLDMPipeline"]  # shipped beside the weights
    assert index["unet"][1] == "UNet2DConditionModel"
    assert index["user_encoder"] == ["condition", "UserConditionEncoder"]
    assert index["user_names"] == [f"user_{i:02d}" for i in range(4)]
    assert (tiny_run["run_dir"] / "ldm" / "samples" / "final.png").exists()
    assert (export / "samples.png").read_bytes() == (tiny_run["run_dir"] / "ldm" / "samples" / "final.png").read_bytes()
    assert "pipeline_tag: unconditional-image-generation" in (export / "README.md").read_text()
    vae_cfg = json.loads((export / "vae" / "config.json").read_text())
    assert 0.05 < vae_cfg["scaling_factor"] < 50 and vae_cfg["scaling_factor"] != 0.18215
