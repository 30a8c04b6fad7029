"""The rerank client libraries people use, each pointed at a server by its base URL the way its docs say.

Each entry ranks ``documents`` for ``query`` through the unmodified library and returns what the library
parsed: ``(index, score)`` best first. ``Client.scale`` says which score the library reports (the
sigmoid relevance, or NIM's raw logit) and ``Client.cut`` whether it returns ``top_n`` results.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

API_KEY = "test-key"  # the SDKs refuse to run without one; the server has none set
Ranked = list[tuple[int, float]]


@dataclass(frozen=True)
class Client:
    """One client library (a provider of it), how it reports scores, and its call."""

    call: Callable[[str, str, str, Sequence[str], int], Ranked]
    scale: str = "sigmoid"  # or "logit"
    cut: bool = True  # returns top_n results (False: every document)


def cohere_v1(base: str, model: str, query: str, documents: Sequence[str], top_n: int) -> Ranked:
    import cohere

    response = cohere.Client(api_key=API_KEY, base_url=base).rerank(
        model=model, query=query, documents=list(documents), top_n=top_n, return_documents=True
    )
    return [(result.index, result.relevance_score) for result in response.results]


def cohere_v2(base: str, model: str, query: str, documents: Sequence[str], top_n: int) -> Ranked:
    import cohere

    response = cohere.ClientV2(api_key=API_KEY, base_url=base).rerank(
        model=model, query=query, documents=list(documents), top_n=top_n
    )
    return [(result.index, result.relevance_score) for result in response.results]


def voyageai(base: str, model: str, query: str, documents: Sequence[str], top_n: int) -> Ranked:
    import voyageai as voyage

    client = voyage.Client(api_key=API_KEY, base_url=base + "/v1", max_retries=0)
    response = client.rerank(query=query, documents=list(documents), model=model, top_k=top_n)
    return [(result.index, result.relevance_score) for result in response.results]


def litellm(provider: str, path: str = "", **kwargs: Any) -> Callable[..., Ranked]:
    """LiteLLM's ``rerank`` through one provider, its ``api_base`` the server's URL (plus ``path``)."""

    def call(base: str, model: str, query: str, documents: Sequence[str], top_n: int) -> Ranked:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch from GitHub
        import litellm as lite

        response = lite.rerank(
            model=f"{provider}/{model}", query=query, documents=list(documents), top_n=top_n,
            api_base=base + path, api_key=API_KEY, **kwargs,
        )  # fmt: skip
        return [(result["index"], result["relevance_score"]) for result in response.results]

    return call


def rerankers(provider: str, path: str) -> Callable[..., Ranked]:
    """The ``rerankers`` library's API ranker (it asks for every document)."""

    def call(base: str, model: str, query: str, documents: Sequence[str], top_n: int) -> Ranked:
        from rerankers import Reranker

        ranker = Reranker(
            model, model_type="APIRanker", api_provider=provider, api_key=API_KEY, url=base + path, verbose=0
        )
        return [
            (result.document.doc_id, result.score)
            for result in ranker.rank(query=query, docs=list(documents)).results
        ]

    return call


def _langchain(compressor: Any, query: str, documents: Sequence[str]) -> Ranked:
    from langchain_core.documents import Document

    docs = [Document(page_content=text, metadata={"i": i}) for i, text in enumerate(documents)]
    return [
        (doc.metadata["i"], doc.metadata["relevance_score"])
        for doc in compressor.compress_documents(docs, query)
    ]


def langchain_cohere(base: str, model: str, query: str, documents: Sequence[str], top_n: int) -> Ranked:
    from langchain_cohere import CohereRerank

    return _langchain(
        CohereRerank(base_url=base, cohere_api_key=API_KEY, model=model, top_n=top_n), query, documents
    )


def langchain_jina(base: str, model: str, query: str, documents: Sequence[str], top_n: int) -> Ranked:
    import langchain_community.document_compressors.jina_rerank as jina

    jina.JINA_API_URL = base + "/v1/rerank"  # its only way to another server
    return _langchain(jina.JinaRerank(jina_api_key=API_KEY, model=model, top_n=top_n), query, documents)


def langchain_nvidia(base: str, model: str, query: str, documents: Sequence[str], top_n: int) -> Ranked:
    from langchain_nvidia_ai_endpoints import NVIDIARerank

    reranker = NVIDIARerank(base_url=base + "/v1", model=model, top_n=top_n, api_key=API_KEY)
    return _langchain(reranker, query, documents)


def _llamaindex(postprocessor: Any, query: str, documents: Sequence[str]) -> Ranked:
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    nodes = [
        NodeWithScore(node=TextNode(text=text, id_=f"doc{i}"), score=0.0) for i, text in enumerate(documents)
    ]
    ranked = postprocessor.postprocess_nodes(nodes, query_bundle=QueryBundle(query))
    return [(int(node.node.node_id[3:]), node.score) for node in ranked]


def llamaindex_cohere(base: str, model: str, query: str, documents: Sequence[str], top_n: int) -> Ranked:
    from llama_index.postprocessor.cohere_rerank import CohereRerank

    return _llamaindex(
        CohereRerank(api_key=API_KEY, model=model, top_n=top_n, base_url=base), query, documents
    )


def llamaindex_jina(base: str, model: str, query: str, documents: Sequence[str], top_n: int) -> Ranked:
    from llama_index.postprocessor.jinaai_rerank import JinaRerank

    return _llamaindex(
        JinaRerank(api_key=API_KEY, model=model, top_n=top_n, base_url=base + "/v1"), query, documents
    )


def llamaindex_tei(base: str, model: str, query: str, documents: Sequence[str], top_n: int) -> Ranked:
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    return _llamaindex(TextEmbeddingInference(base_url=base, model_name=model, top_n=top_n), query, documents)


def llamaindex_nvidia(base: str, model: str, query: str, documents: Sequence[str], top_n: int) -> Ranked:
    from llama_index.postprocessor.nvidia_rerank import NVIDIARerank

    reranker = NVIDIARerank(base_url=base + "/v1", model=model, top_n=top_n, api_key=API_KEY)
    return _llamaindex(reranker, query, documents)


def _haystack(ranker: Any, query: str, documents: Sequence[str]) -> Ranked:
    from haystack import Document

    docs = [Document(content=text, id=str(i)) for i, text in enumerate(documents)]
    return [(int(doc.id), doc.score) for doc in ranker.run(query=query, documents=docs)["documents"]]


def haystack_cohere(base: str, model: str, query: str, documents: Sequence[str], top_n: int) -> Ranked:
    from haystack.utils import Secret
    from haystack_integrations.components.rankers.cohere import CohereRanker

    ranker = CohereRanker(model=model, top_k=top_n, api_key=Secret.from_token(API_KEY), api_base_url=base)
    return _haystack(ranker, query, documents)


def haystack_jina(base: str, model: str, query: str, documents: Sequence[str], top_n: int) -> Ranked:
    from haystack.utils import Secret
    from haystack_integrations.components.rankers.jina import JinaRanker

    ranker = JinaRanker(
        model=model, top_k=top_n, api_key=Secret.from_token(API_KEY), base_url=base + "/v1/rerank"
    )
    return _haystack(ranker, query, documents)


def haystack_nvidia(base: str, model: str, query: str, documents: Sequence[str], top_n: int) -> Ranked:
    from haystack.utils import Secret
    from haystack_integrations.components.rankers.nvidia import NvidiaRanker

    ranker = NvidiaRanker(model=model, top_k=top_n, api_key=Secret.from_token(API_KEY), api_url=base + "/v1")
    ranker.warm_up()
    return _haystack(ranker, query, documents)


CLIENTS: dict[str, Client] = {
    "cohere-v1": Client(cohere_v1),
    "cohere-v2": Client(cohere_v2),
    "voyageai": Client(voyageai),
    "litellm-cohere": Client(litellm("cohere")),
    "litellm-jina": Client(litellm("jina_ai")),
    "litellm-voyage": Client(litellm("voyage")),
    "litellm-hosted-vllm": Client(litellm("hosted_vllm", return_documents=True)),
    "litellm-infinity": Client(litellm("infinity", "/infinity", return_documents=True)),
    "litellm-tei": Client(litellm("huggingface", return_documents=True)),
    "litellm-nim": Client(litellm("nvidia_nim"), scale="logit"),
    "rerankers-cohere": Client(rerankers("cohere", "/v1/rerank"), cut=False),
    "rerankers-jina": Client(rerankers("jina", "/v1/rerank"), cut=False),
    "rerankers-voyage": Client(rerankers("voyage", "/v1/rerank"), cut=False),
    "rerankers-tei": Client(rerankers("text-embeddings-inference", "/rerank"), cut=False),
    "langchain-cohere": Client(langchain_cohere),
    "langchain-jina": Client(langchain_jina),
    "langchain-nvidia": Client(langchain_nvidia, scale="logit"),
    "llamaindex-cohere": Client(llamaindex_cohere),
    "llamaindex-jina": Client(llamaindex_jina),
    "llamaindex-tei": Client(llamaindex_tei),
    "llamaindex-nvidia": Client(llamaindex_nvidia, scale="logit"),
    "haystack-cohere": Client(haystack_cohere),
    "haystack-jina": Client(haystack_jina),
    "haystack-nvidia": Client(haystack_nvidia, scale="logit"),
}
