"""The corpus steps as Apache Beam pipelines: the same output as the local runner, on any Beam runner.

Install with `pip install -e '.[beam]'`. Options are Beam's standard PipelineOptions (`--runner`,
`--project`, `--region`, `--temp_location`, `--setup_file`, ...); without `--runner` the pipelines run
in-process on the FnApiRunner (the DirectRunner may try to download a binary). Output directories are
written through llm/io.py, which uses Beam's FileSystems for paths with a scheme, so they may be gs://
(or s3://, hdfs://) paths.

  filter   sources -> per-document stages -> shards; per-bundle counts -> one merged counts.json
  decontaminate  documents -> the n-gram check against the evaluation sets -> shards; counts as in filter
  dedup    documents -> GroupByKey(exact key) -> the smallest id of each group
           -> MinHash signatures (batched) -> one (band key, (id, signature)) per band -> GroupByKey
           -> pairs confirmed by estimated Jaccard -> Distinct -> all pairs -> duplicate_map (global and
           small) -> side input of the filter that drops the near duplicates -> shards

Shards are written by shard index with `corpus_io.write_shard`, as the local runner writes them: each group
is sorted by id and written whole, so a retried bundle rewrites the same bytes and readers never see a
partial file.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import ml_collections
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms.window import GlobalWindows

from llm.corpus import corpus_io, dedup, pipeline, sources, stages
from llm.corpus.document import Document, Dropped
from llm.corpus.report import Accounts

COUNTS = "counts"
DEFAULT_RUNNER = "FnApiRunner"


def pipeline_options(args: Sequence[str]) -> PipelineOptions:
    """Beam options from command-line style arguments; the runner defaults to the in-process FnApiRunner."""
    options = PipelineOptions(list(args))
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = DEFAULT_RUNNER
    return options


def _counts_output(accounts: Accounts) -> beam.pvalue.TaggedOutput:
    # finish_bundle has no input element to inherit a window from; the pipeline is batch: global window.
    return beam.pvalue.TaggedOutput(COUNTS, GlobalWindows.windowed_value(accounts))


class _MergeAccounts(beam.CombineFn):
    """Sums the per-bundle Accounts of one step (an empty input gives all-zero counts)."""

    def __init__(self, stage_names: Sequence[str]):
        self._stage_names = list(stage_names)

    def create_accumulator(self) -> Accounts:
        return Accounts(self._stage_names)

    def add_input(self, accumulator: Accounts, accounts: Accounts) -> Accounts:
        return accumulator.merge(accounts)

    def merge_accumulators(self, accumulators: Iterable[Accounts]) -> Accounts:
        merged = self.create_accumulator()
        for accumulator in accumulators:
            merged.merge(accumulator)
        return merged

    def extract_output(self, accumulator: Accounts) -> Accounts:
        return accumulator


class _DocumentStages(beam.DoFn):
    """Runs `pipeline.process_item` on every input item; counts per bundle."""

    def __init__(self, config: ml_collections.ConfigDict, make_stages: pipeline.StageFactory):
        self._config = config
        self._make_stages = make_stages

    def setup(self) -> None:
        self._stages = list(self._make_stages(self._config))

    def start_bundle(self) -> None:
        self._accounts = Accounts(pipeline.filter_stage_names(self._stages))

    def process(self, item: Document | Dropped) -> Iterator[Document]:
        document = pipeline.process_item(item, self._stages, self._accounts)
        if document is not None:
            yield document

    def finish_bundle(self) -> Iterator[beam.pvalue.TaggedOutput]:
        yield _counts_output(self._accounts)


class _Decontaminate(beam.DoFn):
    """Runs the decontaminate step's stage (its index built once per worker from the config); counts per bundle."""

    def __init__(self, config: ml_collections.ConfigDict):
        self._config = config

    def setup(self) -> None:
        self._stage = stages.decontamination_stage(self._config)

    def start_bundle(self) -> None:
        self._accounts = Accounts([pipeline.DECONTAMINATE])

    def process(self, document: Document) -> Iterator[Document]:
        kept = pipeline.run_stage(pipeline.DECONTAMINATE, self._stage, document, self._accounts)
        if kept is not None:
            yield kept

    def finish_bundle(self) -> Iterator[beam.pvalue.TaggedOutput]:
        yield _counts_output(self._accounts)


class _DedupStage(beam.DoFn):
    """Counts documents through one dedup stage with `pipeline.count_dedup`, as the local runner does."""

    def __init__(self, stage_names: Sequence[str], stage: str):
        self._stage_names = list(stage_names)
        self._stage = stage

    def start_bundle(self) -> None:
        self._accounts = Accounts(self._stage_names)

    def _kept(self, document: Document, duplicates: Container[str]) -> bool:
        return pipeline.count_dedup(self._stage, document, duplicates, self._accounts)

    def finish_bundle(self) -> Iterator[beam.pvalue.TaggedOutput]:
        yield _counts_output(self._accounts)


class _KeepSmallest(_DedupStage):
    """Exact dedup of one group of documents with the same exact key (`dedup.exact_duplicates`)."""

    def __init__(self, stage_names: Sequence[str]):
        super().__init__(stage_names, pipeline.EXACT_DEDUP)

    def process(self, group: tuple[str, Iterable[Document]]) -> Iterator[Document]:
        key, documents = group[0], list(group[1])
        duplicates = dedup.exact_duplicates([document.id for document in documents], [key] * len(documents))
        yield from (document for document in documents if self._kept(document, duplicates))


class _Signatures(beam.DoFn):
    """(id, MinHash signature) of every document of a batch (the hasher is vectorised over the batch)."""

    def __init__(self, config: ml_collections.ConfigDict):
        self._config = config

    def setup(self) -> None:
        self._hasher = dedup.MinHasher.from_config(self._config.dedup)

    def process(self, batch: list[Document]) -> Iterator[tuple[str, Any]]:
        signatures = self._hasher.signatures([document.text for document in batch])
        yield from zip((document.id for document in batch), signatures)


class _NearDuplicates(beam.PTransform):
    """Documents -> a single frozenset of the ids of near duplicates (the smallest id of a cluster is kept)."""

    def __init__(self, config: ml_collections.ConfigDict, batch_size: int):
        super().__init__()
        self._config = config
        self._batch_size = batch_size

    def expand(self, documents: beam.PCollection) -> beam.PCollection:
        params = self._config.dedup
        return (
            documents
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self._batch_size)
            | "Signatures" >> beam.ParDo(_Signatures(self._config))
            | "BandKeys"
            >> beam.FlatMap(lambda item: [(key, item) for key in dedup.band_keys(item[1], params.bands, params.rows)])
            | "GroupBands" >> beam.GroupByKey()
            | "ConfirmPairs" >> beam.FlatMap(lambda bucket: dedup.bucket_pairs(list(bucket[1]), params.threshold))
            | "DistinctPairs" >> beam.Distinct()
            # The cluster resolution is global but small: one pair per duplicate, not per document.
            | "AllPairs" >> beam.combiners.ToList()
            | "Clusters" >> beam.Map(lambda pairs: frozenset(dedup.duplicate_map(pairs)))
        )


class _DropNearDuplicates(_DedupStage):
    """Drops the documents that `duplicate_map` maps to a kept one (the side input)."""

    def __init__(self, stage_names: Sequence[str]):
        super().__init__(stage_names, pipeline.NEAR_DEDUP)

    def process(self, document: Document, duplicates: frozenset[str]) -> Iterator[Document]:
        if self._kept(document, duplicates):
            yield document


def _write_shard(group: tuple[int, dict[str, Iterable[Any]]], output_dir: str, num_shards: int) -> str:
    index, grouped = group
    return corpus_io.write_shard(output_dir, index, num_shards, grouped["documents"])


class _WriteShards(beam.PTransform):
    """Writes documents into `num_shards` shards, each sorted by id, empty shards included."""

    def __init__(self, output_dir: str, num_shards: int):
        super().__init__()
        self._output_dir = output_dir
        self._num_shards = num_shards

    def expand(self, documents: beam.PCollection) -> beam.PCollection:
        n = self._num_shards
        keyed = documents | "ByShard" >> beam.Map(lambda document: (corpus_io.shard_of(document.id, n), document))
        # Every shard index joins the group, so a shard with no documents is still written (empty).
        every = documents.pipeline | "AllShards" >> beam.Create([(index, None) for index in range(n)])
        return (
            {"documents": keyed, "index": every}
            | "GroupShards" >> beam.CoGroupByKey()
            | "WriteShard" >> beam.Map(_write_shard, self._output_dir, n)
        )


def _write_counts(counts: beam.PCollection, stage_names: Sequence[str], output_dir: str) -> None:
    (
        counts
        | "MergeCounts" >> beam.CombineGlobally(_MergeAccounts(stage_names))
        | "WriteCounts" >> beam.Map(corpus_io.write_counts_file, output_dir)
    )


def _read_corpus(p: beam.Pipeline, input_dir: str) -> beam.PCollection:
    """The documents of a corpus step's output directory."""
    return (
        p
        | "ReadDocuments" >> beam.io.ReadFromText(corpus_io.shard_pattern(input_dir))
        | "Decode" >> beam.Map(corpus_io.decode_document, input_dir)
    )


def _read_all(_: Any, config: ml_collections.ConfigDict, read: pipeline.SourceReader) -> Iterator[Any]:
    yield from read(config)


class BeamRunner:
    """Runs the `filter` and `dedup` corpus steps as Beam pipelines with the given pipeline options."""

    name = "beam"

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        pipeline_args: Sequence[str] = (),
        read: pipeline.SourceReader = sources.read_sources,
        make_stages: pipeline.StageFactory = stages.document_stages,
    ):
        self._options = pipeline_options(pipeline_args)
        self._batch_size = config.runner.chunk_size
        self._read = read
        self._make_stages = make_stages

    def filter(self, config: ml_collections.ConfigDict, output_dir: str) -> Accounts:
        """Reads the sources, runs the per-document stages, writes the survivors as sorted shards."""
        stage_names = pipeline.filter_stage_names(self._make_stages(config))
        with beam.Pipeline(options=self._options) as p:
            # Sources are one stream (ids follow the order of the files); the Reshuffle spreads its
            # documents over all workers for the stages, which are where the time goes.
            items = (
                p
                | "Start" >> beam.Create([None])
                | "ReadSources" >> beam.FlatMap(_read_all, config, self._read)
                | "Spread" >> beam.Reshuffle()
            )
            results = items | "DocumentStages" >> beam.ParDo(_DocumentStages(config, self._make_stages)).with_outputs(
                COUNTS, main="documents"
            )
            results.documents | "WriteDocuments" >> _WriteShards(output_dir, config.output.corpus_shards)
            _write_counts(results[COUNTS], stage_names, output_dir)
        return corpus_io.read_counts(output_dir)

    def dedup(self, config: ml_collections.ConfigDict, input_dir: str, output_dir: str) -> Accounts:
        """Exact then near dedup of the filter step's output; writes the cleaned corpus as sorted shards."""
        stage_names = pipeline.dedup_stage_names(config)
        with beam.Pipeline(options=self._options) as p:
            documents = _read_corpus(p, input_dir)
            counts = []
            if config.dedup.exact:
                exact = (
                    documents
                    | "ByExactKey" >> beam.Map(lambda document: (dedup.exact_key(document.text), document))
                    | "GroupExact" >> beam.GroupByKey()
                    | "KeepSmallest" >> beam.ParDo(_KeepSmallest(stage_names)).with_outputs(COUNTS, main="kept")
                )
                documents = exact.kept
                counts.append(exact[COUNTS])
            if config.dedup.near:
                duplicates = documents | "FindNearDuplicates" >> _NearDuplicates(config, self._batch_size)
                near = documents | "DropNearDuplicates" >> beam.ParDo(
                    _DropNearDuplicates(stage_names), duplicates=beam.pvalue.AsSingleton(duplicates)
                ).with_outputs(COUNTS, main="kept")
                documents = near.kept
                counts.append(near[COUNTS])
            documents | "WriteCorpus" >> _WriteShards(output_dir, config.output.corpus_shards)
            _write_counts(tuple(counts) | "AllCounts" >> beam.Flatten(pipeline=p), stage_names, output_dir)
        return corpus_io.read_counts(output_dir)

    def decontaminate(self, config: ml_collections.ConfigDict, input_dir: str, output_dir: str) -> Accounts:
        """Drops the documents of `input_dir` that share an n-gram with an evaluation set; writes the rest."""
        with beam.Pipeline(options=self._options) as p:
            results = _read_corpus(p, input_dir) | "Decontaminate" >> beam.ParDo(_Decontaminate(config)).with_outputs(
                COUNTS, main="kept"
            )
            results.kept | "WriteCorpus" >> _WriteShards(output_dir, config.output.corpus_shards)
            _write_counts(results[COUNTS], [pipeline.DECONTAMINATE], output_dir)
        return corpus_io.read_counts(output_dir)
