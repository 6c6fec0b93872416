from gpt2ipu.generate.batch import generate
from gpt2ipu.generate.sampling import SamplingConfig
from gpt2ipu.workflow_adapter import bpe_tokenizer, run_stage

settings = dict(snakemake.params.settings)  # the config's generate section: sampling + run options
options = {key: settings.pop(key) for key in ("stop_token", "batch_size", "device", "precision", "weights")}
run_stage(snakemake, generate, model_dir=snakemake.input.model, prompts_path=snakemake.input.prompts,
          out=snakemake.output.continuations, provenance_path=snakemake.output.provenance,
          config=SamplingConfig(**settings), vocab_dir=snakemake.params.vocab_dir,
          bpe_tokenizer=bpe_tokenizer(snakemake), torch_threads=True, ops_dir=snakemake.input.ops,
          **options)
