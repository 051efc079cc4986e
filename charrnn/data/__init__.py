"""Corpora in bounded memory: reading text, documents, the train/validation split, the token file
and the B-stream batches over it. Memory is a few chunks, never the corpus: a 1 GB text trains
from a token file of 1 GB on disk, mapped read-only.

One module per concern, in the order the data flows:

    reading.py    decoding files and stdin in chunks (strict UTF-8 or --encoding, binary
                  detection, BOM and newlines), the --max-input limit, Source
    documents.py  --docs line | blank: splitting, pieces that end at separators, encoding a
                  text or its documents as token ids
    corpus.py     pass 1: Corpus and read_corpus (hash, length, vocabulary, document counts)
    split.py      the contiguous train/validation split: where validation begins, the sizes of
                  the two streams (Split), the size checks
    tokenfile.py  pass 2: tokens.npy and tokens.json (build, open, map, clean up)
    batches.py    BatchStream: B contiguous streams, T steps at a time

The chunked pipeline gives exactly what the whole-text one gave (tests/wholetext.py keeps that one
as the reference): the same hash, so runs made before still resume, the same vocabulary, the same
split and the same token ids. Capping the vocabulary (--max-vocab) is vocab.py's, re-exported
here. Not here: anything with models or the command line.
"""

from charrnn.data.batches import BatchStream
from charrnn.data.corpus import Corpus, read_corpus
from charrnn.data.documents import DOC_MODES, MAX_DOCUMENT_CHARS, document_pieces, encode_stream, split_documents
from charrnn.data.reading import (CHUNK_BYTES, ByteLimit, InputTooLarge, Source, decode_text, input_name,
                                  open_input, read_text)
from charrnn.data.split import Split, check_sizes, check_split, plan_split, splitter, total_tokens
from charrnn.data.tokenfile import (TOKENS_FILE, TOKENS_FORMAT, TOKENS_HASH_CHUNK, TOKENS_META, TOKENS_META_LIMIT,
                                    TokenFile, build_token_file, compact_dtype, ids_digest, map_token_file, read_token_file,
                                    open_token_file, regular_file, remove_stale_token_temps)
from charrnn.vocab import Capped, capped_vocab

# Constants are re-exported to be read; a test that patches one patches the module that holds it
# (charrnn.data.documents.MAX_DOCUMENT_CHARS), where the code reads it.
__all__ = [
    # reading.py
    "CHUNK_BYTES", "ByteLimit", "InputTooLarge", "Source", "decode_text", "input_name", "open_input", "read_text",
    # documents.py
    "DOC_MODES", "MAX_DOCUMENT_CHARS", "document_pieces", "encode_stream", "split_documents",
    # corpus.py
    "Corpus", "read_corpus",
    # split.py
    "Split", "check_sizes", "check_split", "plan_split", "splitter", "total_tokens",
    # tokenfile.py
    "TOKENS_FILE", "TOKENS_FORMAT", "TOKENS_HASH_CHUNK", "TOKENS_META", "TOKENS_META_LIMIT", "TokenFile",
    "build_token_file", "compact_dtype", "ids_digest", "map_token_file", "open_token_file", "read_token_file", "regular_file",
    "remove_stale_token_temps",
    # batches.py
    "BatchStream",
    # vocab.py
    "Capped", "capped_vocab",
]
