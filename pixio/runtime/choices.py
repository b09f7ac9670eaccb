"""The values of the shared config's choice keys, in a module that loads no torch: the config
checks (`pixio.runtime.config`, the evaluation apps' configs) read them before anything heavy is
imported, and the modules that act on them (`compile`, `optim`, `parallel`,
`pixio.models.baselines`, `pixio.knn`) import them from here."""

COMPILE_CHOICES = ("auto", "true", "false")  # train.compile
OPTIMIZERS = ("adamw", "lars")  # optim.name
SCHEDULES = ("cosine", "poly", "constant")  # optim.schedule
PARALLEL_CHOICES = ("auto", "none", "ddp", "fsdp")  # train.parallel
ENCODER_SOURCES = ("pixio", "transformers", "timm")  # encoder.source: where the model comes from
FEATURE_POOLS = ("cls", "avgpool", "both")  # linear.feature, k-NN's pool (pixio.knn)
