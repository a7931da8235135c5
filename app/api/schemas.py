"""The API's request and response shapes (pydantic): what each route validates before it runs and
what OpenAPI documents. OpenAI's shapes where one exists (chat completions, models, embeddings).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from retrieval.search import MODES

SearchMode = Literal[MODES]  # the Literal of each mode: validated, and listed as the enum in OpenAPI


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


# Hard ceilings in the schema, so that pydantic refuses a huge list before building its items;
# the configured caps (MOERAG_API_MAX_*), checked in the routes, are lower.
LIST_CEILING = 10_000


class MoeragOptions(BaseModel):
    collections: list[str] | None = Field(None, max_length=LIST_CEILING, description=(
        "Collections to search (repeats are searched once; at most MOERAG_API_MAX_COLLECTIONS different ones); "
        "default: the one named by `model`."))
    web: bool = Field(False, description="Also search the live web; its results are ranked with the knowledge base's. "
                                         "Needs a key created with --web.")
    k: int | None = Field(None, ge=1, le=50, description="Sources to retrieve.")
    mode: SearchMode | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields moerag ignores (n, top_p, ...)
    model: str = Field(..., description="A collection name (GET /v1/models lists them).")
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=LIST_CEILING, description=(
        "At most MOERAG_API_MAX_MESSAGES messages of MOERAG_API_MAX_CHARS characters together."))
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=131072, description="At most MOERAG_API_MAX_TOKENS.")
    reasoning_effort: Literal["low", "medium", "high"] | None = Field(None, description=(
        "How much a model with the switch (gpt-oss) reasons before answering; others ignore it."))
    moerag: MoeragOptions | None = None


class SourceOut(BaseModel):
    n: int
    domain: str | None = None
    fetched_at: str | None = None
    text: str
    snippet: str
    title: str
    source: str
    url: str | None
    collection: str
    page: int | None
    heading: str | None
    start: int
    end: int
    score: float
    origin: str
    document_id: int | None
    chunk_id: int | None
    cut: bool


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str = "stop"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AnswerInfo(BaseModel):
    cited: list[int] = Field(description="Source numbers the answer cites (1-based indexes into `citations`).")
    warnings: list[str]
    timings: dict[str, float]
    generator: str


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    citations: list[SourceOut] = Field(description="The numbered sources given to the generator; [n] in the answer is citations[n-1].")
    moerag: AnswerInfo


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moerag"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    input: str | Annotated[list[str], Field(min_length=1)] = Field(
        ..., description="Text or texts to embed (at most MOERAG_API_MAX_EMBED_INPUTS of MOERAG_API_MAX_EMBED_CHARS "
                         "characters together); token-id input is not supported."
    )
    model: str = Field("", description="Any value: the knowledge base's embedder is used.")
    encoding_format: Literal["float", "base64"] = "float"


class EmbeddingOut(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingOut]
    model: str
    usage: EmbeddingUsage


class SearchRequest(BaseModel):
    query: str = Field(..., min_length=1, description="At most MOERAG_API_MAX_CHARS characters.")
    collection: str | None = Field(None, description="Default: the server's default collection.")
    k: int = Field(10, ge=1, le=100)
    mode: SearchMode | None = None
    source: str | None = Field(None, description="Only documents whose source starts with this.")


class DocumentRef(BaseModel):
    id: int
    source: str
    title: str


class SearchHit(BaseModel):
    rank: int
    score: float
    chunk_id: int
    text: str
    document: DocumentRef
    page: int | None
    heading: str | None
    start: int
    end: int
    ranks: dict[str, int]


class DocumentOut(BaseModel):
    id: int
    source: str
    title: str
    status: str
    error: str | None
    chunks: int


UPLOAD_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"},
                             "description": "Files to ingest (at most MOERAG_API_MAX_FILES, each at most "
                                            "MOERAG_MAX_FILE_MB)."}}}}}}}


class UploadResult(BaseModel):
    filename: str
    status: str = Field(description="added, updated, unchanged or failed")
    chunks: int
    error: str | None


class UploadResponse(BaseModel):
    collection: str
    results: list[UploadResult]


class Deleted(BaseModel):
    deleted: list[int]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
