package embedd

// Model names of protocol v1: the daemon's built-in models, as listed in
// embedd.models.CATALOG (tests/test_catalog.py checks that the two agree).
const (
	ModelMuQ    = "muq"
	ModelMERT   = "mert"
	ModelLatent = "latent"
)

// Vector formats a request may ask for. The client decodes both; the
// default (bin) is four times smaller on the wire.
const (
	VectorFormatBin  = "bin"
	VectorFormatList = "list"
)

// PingResult is the answer to ping.
type PingResult struct {
	Version  string  `msgpack:"version"`
	Protocol int     `msgpack:"protocol"`
	UptimeS  float64 `msgpack:"uptime_s"`
}

// ModelStatus describes one model in Status.
type ModelStatus struct {
	Loaded bool `msgpack:"loaded"`
	// State is "unloaded", "loading", "idle" or "running".
	State string `msgpack:"state"`
	// Running lists the lanes ("interactive", "batch") inside the model now.
	Running []string `msgpack:"running"`
	// Pinned is true while the running batch job uses the model: it is never idle-unloaded.
	Pinned     bool     `msgpack:"pinned"`
	IdleS      *float64 `msgpack:"idle_s"` // nil unless loaded and idle
	Dim        int      `msgpack:"dim"`
	Collection string   `msgpack:"collection"`
	Text       bool     `msgpack:"text"`
	// Error is the last load error, while the model cannot be loaded.
	Error *string `msgpack:"error"`
	// Compile is nil unless the model is loaded and compiled by the daemon's compile setting.
	Compile *CompileStatus `msgpack:"compile"`
}

// CompileStatus is a loaded model's compilation (docs/protocol.md, status).
type CompileStatus struct {
	// State is "waiting", "compiling", "ready", "slower", "failed" or "stopped".
	State     string   `msgpack:"state"`
	Shape     []int    `msgpack:"shape"` // the one item shape that runs compiled
	CompileS  *float64 `msgpack:"compile_s"`
	EagerS    *float64 `msgpack:"eager_s"`
	CompiledS *float64 `msgpack:"compiled_s"`
	// Cache counts inductor's cache "hits" and "misses" during this load (a miss is a compilation).
	Cache map[string]int `msgpack:"cache"`
	Items int            `msgpack:"items"` // items run through the compiled code
	Error *string        `msgpack:"error"`
}

// PassStatus is one forward pass of a lane: in flight (AgeS set) or done (Seconds set).
type PassStatus struct {
	Lane       string   `msgpack:"lane"`
	Model      string   `msgpack:"model"`
	Items      int      `msgpack:"items"`
	AgeS       *float64 `msgpack:"age_s"`
	Seconds    *float64 `msgpack:"seconds"`
	StartedSeq int64    `msgpack:"started_seq"`
	EndedSeq   *int64   `msgpack:"ended_seq"`
}

// LaneStatus is one executor lane: its queue, its pass in flight, how it shares the CPU.
type LaneStatus struct {
	Depth       int         `msgpack:"depth"`
	OldestWaitS *float64    `msgpack:"oldest_wait_s"`
	Pass        *PassStatus `msgpack:"pass"`
	Yielding    bool        `msgpack:"yielding"` // waiting at a pass boundary for interactive work
	Threads     *int        `msgpack:"threads"`
	Nice        int         `msgpack:"nice"`
	PassBudgetS *float64    `msgpack:"pass_budget_s"`
	Dropped     int64       `msgpack:"dropped"`
	Overloaded  int64       `msgpack:"overloaded"`
}

// ExecutorJob is one job the executor ran, in its sequence of events.
type ExecutorJob struct {
	Lane string `msgpack:"lane"` // "control", "interactive" or "batch"
	Kind string `msgpack:"kind"` // "audio", "text" or "call"
	// Model is "" for a job that needs no model.
	Model      string `msgpack:"model"`
	QueuedSeq  int64  `msgpack:"queued_seq"`
	StartedSeq int64  `msgpack:"started_seq"`
	DoneSeq    int64  `msgpack:"done_seq"`
}

// ExecutorRecent is the executor's last passes and jobs (64 of each at most).
type ExecutorRecent struct {
	Passes []PassStatus  `msgpack:"passes"`
	Jobs   []ExecutorJob `msgpack:"jobs"`
}

// ExecutorStatus is the model executor's two lanes ("interactive", "batch").
type ExecutorStatus struct {
	Lanes  map[string]LaneStatus `msgpack:"lanes"`
	Recent ExecutorRecent        `msgpack:"recent"`
	// Seq is this answer's place in the executor's sequence of events.
	Seq int64 `msgpack:"seq"`
}

// DecoderLaneStatus is one lane ("interactive", "batch") of the audio decoder pool.
type DecoderLaneStatus struct {
	Depth       int      `msgpack:"depth"` // decodes waiting for a worker
	OldestWaitS *float64 `msgpack:"oldest_wait_s"`
	Running     int      `msgpack:"running"` // decodes in the workers now
}

// StoreLaneStatus is one lane ("read", "write") of the vector store's threads.
type StoreLaneStatus struct {
	Depth       int      `msgpack:"depth"`
	OldestWaitS *float64 `msgpack:"oldest_wait_s"`
	RunningS    *float64 `msgpack:"running_s"` // how long the call in progress has run; nil when idle
}

// AdmissionStatus is the bound on work admitted, socket and HTTP together.
type AdmissionStatus struct {
	InFlight        int   `msgpack:"in_flight"`
	Limit           int   `msgpack:"limit"` // max_inflight_requests
	BytesHeld       int64 `msgpack:"bytes_held"`
	BytesLimit      int64 `msgpack:"bytes_limit"` // max_inflight_mb, in bytes
	OverloadedTotal int64 `msgpack:"overloaded_total"`
	// Overloaded counts the refusals per bound ("requests", "bytes").
	Overloaded map[string]int64 `msgpack:"overloaded"`
}

// LegacyCollection is a collection of the system embedd replaces, found
// under or beside a public name (docs/protocol.md, status).
type LegacyCollection struct {
	Collection string `msgpack:"collection"`
	Public     string `msgpack:"public"`
	Model      string `msgpack:"model"`
	Rows       *int64 `msgpack:"rows"` // nil when Milvus would not count them
	// Serving is true while it still holds its public name.
	Serving bool `msgpack:"serving"`
}

// LibraryWatchPoll is the cost of the library watcher's last poll.
type LibraryWatchPoll struct {
	RowsRead     int     `msgpack:"rows_read"`
	DiffRowsRead int     `msgpack:"diff_rows_read"`
	DurationS    float64 `msgpack:"duration_s"`
}

// LibraryWatchStatus is the library watcher, which starts automatic batch
// jobs when Navidrome's library changes (docs/operations.md).
type LibraryWatchStatus struct {
	Enabled        bool     `msgpack:"enabled"`
	LastSeenAt     *float64 `msgpack:"last_seen_at"`
	LastScanAt     *float64 `msgpack:"last_scan_at"`
	ScanInProgress bool     `msgpack:"scan_in_progress"`
	// Pending counts the changed tracks waiting for an automatic job, by kind
	// ("added", "changed", "removed").
	Pending     map[string]int `msgpack:"pending"`
	HeldMissing int            `msgpack:"held_missing"`
	NextJobAt   *float64       `msgpack:"next_job_at"`
	// Waiting says why pending tracks wait ("quiet_period", "job_running", "off", ...); nil when not.
	Waiting        *string          `msgpack:"waiting"`
	LastActivityAt *float64         `msgpack:"last_activity_at"`
	QuietS         float64          `msgpack:"quiet_s"`
	PollS          float64          `msgpack:"poll_s"`
	Models         []string         `msgpack:"models"` // nil: the models whose collections hold vectors
	LastJobID      *string          `msgpack:"last_job_id"`
	AutoJobs       int              `msgpack:"auto_jobs"`
	Polls          int              `msgpack:"polls"`
	LastPoll       LibraryWatchPoll `msgpack:"last_poll"`
	Error          *string          `msgpack:"error"`
}

// QueueStatus is the depth of the daemon's work queues.
type QueueStatus struct {
	Interactive int `msgpack:"interactive"`
	Batch       int `msgpack:"batch"`
}

// MilvusStatus says which vector store the daemon uses and whether it answers.
type MilvusStatus struct {
	URI string `msgpack:"uri"`
	OK  bool   `msgpack:"ok"`
}

// StatusResult is the answer to status.
type StatusResult struct {
	Version string `msgpack:"version"`
	Device  string `msgpack:"device"`
	// Allocator is the memory allocator the daemon runs on: "tcmalloc",
	// "jemalloc" or "system"; empty from a daemon older than the setting.
	Allocator string                 `msgpack:"allocator"`
	Models    map[string]ModelStatus `msgpack:"models"`
	Batch     *Progress              `msgpack:"batch"` // nil when no job has run
	Queue     QueueStatus            `msgpack:"queue"`
	// Executor is nil from a daemon older than the lanes.
	Executor *ExecutorStatus `msgpack:"executor"`
	// Decoder is the audio decoder's lanes; nil before the daemon started it.
	Decoder map[string]DecoderLaneStatus `msgpack:"decoder"`
	// Store is the vector store's lanes ("read", "write").
	Store     map[string]StoreLaneStatus `msgpack:"store"`
	Admission *AdmissionStatus           `msgpack:"admission"`
	Milvus    MilvusStatus               `msgpack:"milvus"`
	// LegacyCollections is nil when Milvus did not answer in time.
	LegacyCollections []LegacyCollection `msgpack:"legacy_collections"`
	// LibraryWatch is nil without a Navidrome database (no watcher).
	LibraryWatch *LibraryWatchStatus `msgpack:"library_watch"`
}

// EmbedFileRequest asks for the embeddings of one audio file. Give exactly
// one of Path (a file the daemon reads itself) or Data with Filename (bytes
// uploaded in the request).
type EmbedFileRequest struct {
	Path     string
	Data     []byte
	Filename string
	// Models defaults to ["muq"] on the daemon when empty.
	Models []string
	// Store upserts the result into each model's collection; it needs TrackID.
	Store   bool
	TrackID string
	// Name is an optional display name for logs and stored metadata.
	Name string
	// VectorFormat is "" (the daemon's default, bin) or one of VectorFormat*.
	VectorFormat string
}

// ModelEmbedding is one model's result for a file.
type ModelEmbedding struct {
	Dim     int    `msgpack:"dim"`
	Windows int    `msgpack:"windows"`
	Vector  Vector `msgpack:"vector"`
}

// EmbedFileResult is the answer to embed_file.
type EmbedFileResult struct {
	DurationS float64                   `msgpack:"duration_s"`
	Models    map[string]ModelEmbedding `msgpack:"models"`
}

// EmbedTextRequest asks for a text query's embedding.
type EmbedTextRequest struct {
	Text string
	// Model defaults to "muq" on the daemon when empty.
	Model        string
	VectorFormat string
}

// EmbedTextResult is the answer to embed_text. Vector is laid out in the
// stored collection's dimension, ready for Search; Raw is the model's
// joint-space text embedding.
type EmbedTextResult struct {
	Model  string `msgpack:"model"`
	Dim    int    `msgpack:"dim"`
	Vector Vector `msgpack:"vector"`
	Raw    Vector `msgpack:"raw"`
}

// SearchRequest finds the tracks nearest to a query. Model is required;
// give exactly one of Vector, TrackID or Text.
type SearchRequest struct {
	Model   string
	Vector  []float32
	TrackID string
	Text    string
	// Limit defaults to 20 on the daemon when 0; the daemon accepts 1..1000.
	Limit           int
	ExcludeTrackIDs []string
}

// Hit is one search result.
type Hit struct {
	TrackID string  `msgpack:"track_id"`
	Score   float64 `msgpack:"score"`
	Path    string  `msgpack:"path"`
	Title   string  `msgpack:"title"`
	Artist  string  `msgpack:"artist"`
	Album   string  `msgpack:"album"`
}

// SearchResult is the answer to search, best hit first.
type SearchResult struct {
	Hits []Hit `msgpack:"hits"`
}

// BatchStartRequest starts embedding the library.
type BatchStartRequest struct {
	// Models defaults to all three on the daemon when empty.
	Models []string
	// ClearExisting re-embeds every track instead of only new or changed ones.
	ClearExisting bool
	// Shard is "" or "i/n": embed only the tracks in shard i of n.
	Shard string
}

// BatchStartResult is the answer to batch_start.
type BatchStartResult struct {
	JobID       string `msgpack:"job_id"`
	TotalTracks int    `msgpack:"total_tracks"`
}

// Batch job statuses.
const (
	StatusIdle                = "idle"
	StatusRunning             = "running"
	StatusPaused              = "paused"
	StatusCancelling          = "cancelling"
	StatusCompleted           = "completed"
	StatusCompletedWithErrors = "completed_with_errors"
	StatusFailed              = "failed"
	StatusCancelled           = "cancelled"
)

// Progress is the progress map of a batch job. Nil on the wire becomes ""
// for strings and nil for the optional times.
type Progress struct {
	JobID               string   `msgpack:"job_id"`
	Status              string   `msgpack:"status"`
	Models              []string `msgpack:"models"`
	TotalTracks         int      `msgpack:"total_tracks"`
	ProcessedTracks     int      `msgpack:"processed_tracks"`
	FailedTracks        int      `msgpack:"failed_tracks"`
	SkippedTracks       int      `msgpack:"skipped_tracks"`
	CurrentTrack        string   `msgpack:"current_track"`
	ProgressPercent     float64  `msgpack:"progress_percent"`
	StartedAt           *float64 `msgpack:"started_at"`
	EstimatedCompletion *float64 `msgpack:"estimated_completion"`
	RateTracksPerS      *float64 `msgpack:"rate_tracks_per_s"`
	RekeyedTracks       int      `msgpack:"rekeyed_tracks"`
	// Trigger is "manual" (batch_start) or "auto" (the library watcher); empty before any job.
	Trigger string `msgpack:"trigger"`
	// Waiting says why a running job is stalled (Milvus or the Ray cluster unreachable); nil otherwise.
	Waiting *string `msgpack:"waiting"`
	// LibraryWatch is the library watcher, in batch_progress answers only
	// (not in status's batch, nor from batch_watch, pause or resume).
	LibraryWatch *LibraryWatchStatus `msgpack:"library_watch"`
	// Cluster is the Ray cluster the job's model work runs on (ray_address); nil when it runs in the daemon.
	Cluster *ClusterStatus `msgpack:"cluster"`
}

// ClusterStatus is the Ray cluster a library job runs on, and its model workers.
type ClusterStatus struct {
	Address string `msgpack:"address"`
	// State is closed (no job), connecting, up, down (waiting for it) or fallback (the job went on in the daemon).
	State     string          `msgpack:"state"`
	Error     *string         `msgpack:"error"`
	DownSince *float64        `msgpack:"down_since"`
	Fallback  string          `msgpack:"fallback"`
	Workers   []ClusterWorker `msgpack:"workers"`
}

// ClusterWorker is one Ray model worker: where it runs and what it did.
type ClusterWorker struct {
	Name          string   `msgpack:"name"`
	State         string   `msgpack:"state"`
	Host          string   `msgpack:"host"`
	Device        string   `msgpack:"device"`
	PID           int      `msgpack:"pid"`
	Allocator     string   `msgpack:"allocator"` // the memory allocator its process runs on; "" until ready
	Models        []string `msgpack:"models"`
	InFlight      int      `msgpack:"in_flight"`
	TracksDone    int      `msgpack:"tracks_done"`
	TracksFailed  int      `msgpack:"tracks_failed"`
	TracksPerHour *float64 `msgpack:"tracks_per_hour"`
	Restarts      int      `msgpack:"restarts"`
	LastError     *string  `msgpack:"last_error"`
}

// Final reports whether the job has stopped for good (it will not change
// again without a new batch_start).
func (p *Progress) Final() bool {
	switch p.Status {
	case StatusCompleted, StatusCompletedWithErrors, StatusFailed, StatusCancelled:
		return true
	}
	return false
}

// BatchCancelResult is the answer to batch_cancel.
type BatchCancelResult struct {
	Status string `msgpack:"status"`
}

// BatchFailuresRequest pages through the latest job's failures. Zero values
// take the daemon's defaults (limit 100, offset 0).
type BatchFailuresRequest struct {
	Limit  int
	Offset int
}

// Failure is one track a batch job could not embed.
type Failure struct {
	TrackID string `msgpack:"track_id"`
	Path    string `msgpack:"path"`
	Model   string `msgpack:"model"`
	Code    Code   `msgpack:"code"`
	Message string `msgpack:"message"`
}

// BatchFailuresResult is the answer to batch_failures.
type BatchFailuresResult struct {
	Total    int       `msgpack:"total"`  // failed (track, model) pairs
	Tracks   int       `msgpack:"tracks"` // distinct tracks among them (the progress's failed_tracks)
	Failures []Failure `msgpack:"failures"`
}

// UnloadResult is the answer to unload.
type UnloadResult struct {
	Unloaded []string `msgpack:"unloaded"`
	// Kept is the loaded models it left alone, each with why (a lane is
	// running work in it, or the running batch job uses it).
	Kept map[string]string `msgpack:"kept"`
}
