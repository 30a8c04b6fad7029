import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from jobs.rescore import main
from tests.helpers import DL19_TSV, TWIN_MODEL, read_trec_tsv, require

pytestmark = [pytest.mark.integration, pytest.mark.shared, pytest.mark.usefixtures("ray_session")]


def test_job_rescoring_dl19_matches_cross_encoder_predict(tmp_path, capsys):
    """The 4,300 DL19 pairs through the job: all rows and columns intact, scores within 1e-5."""
    from sentence_transformers import CrossEncoder

    pairs = read_trec_tsv(require(DL19_TSV))
    pairs.to_parquet(tmp_path / "dl19.parquet", index=False)
    code = main(
        [
            "--input",
            str(tmp_path / "dl19.parquet"),
            "--output",
            str(tmp_path / "out"),
            "--model",
            str(require(TWIN_MODEL)),
        ]
    )
    assert code == 0, capsys.readouterr().err
    out = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pandas()
    assert len(out) == 4300 and list(out.columns) == ["qid", "pid", "query", "passage", "score"]
    merged = pairs.reset_index().merge(out, on=["qid", "pid", "query", "passage"]).drop_duplicates("index")
    assert len(merged) == 4300
    reference = CrossEncoder(str(TWIN_MODEL), activation_fn=torch.nn.Identity()).predict(
        list(zip(merged["query"], merged["passage"], strict=True)), batch_size=64
    )
    assert float(np.abs(merged["score"].to_numpy() - reference).max()) <= 1e-5
