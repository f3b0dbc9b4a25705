"""The wire contract: versioned Avro canonical events, their catalog and codecs."""

from revline.schemas._catalog import (
    EVENT_TYPES,
    RECORD_NAMES,
    SchemaCatalog,
    SchemaEntry,
    crc64_fingerprint,
    default_catalog,
)
from revline.schemas._codec import (
    DecodeError,
    EncodeError,
    EventDeserializer,
    EventSerializer,
    MalformedRecordError,
    MislabelledRecordError,
    RegistryUnavailableError,
    UnknownSchemaError,
    WireFormat,
    registry_client,
)
from revline.schemas._models import EVENT_MODELS, EventValidationError, validate_event
from revline.schemas._records import RecordCodec, exception_codec, outcome_codec
from revline.schemas._structure import REQUIRED_REFS, structural_error

__all__ = [
    "EVENT_MODELS",
    "EVENT_TYPES",
    "RECORD_NAMES",
    "REQUIRED_REFS",
    "DecodeError",
    "EncodeError",
    "EventDeserializer",
    "EventSerializer",
    "EventValidationError",
    "MalformedRecordError",
    "MislabelledRecordError",
    "RecordCodec",
    "RegistryUnavailableError",
    "SchemaCatalog",
    "SchemaEntry",
    "UnknownSchemaError",
    "WireFormat",
    "crc64_fingerprint",
    "default_catalog",
    "exception_codec",
    "outcome_codec",
    "registry_client",
    "structural_error",
    "validate_event",
]
