// moeforge export: rewrite a model in another format — a Hugging Face
// directory (LLaMA / Qwen2 / Mixtral / Qwen2-MoE names), a moeforge native
// directory, or a packed one (native, weights as kernel panels) — without
// changing what it computes.
#include <filesystem>
#include <iostream>

#include "commands.hpp"
#include "model_args.hpp"
#include "moeforge/io/hf.hpp"
#include "moeforge/io/native.hpp"
#include "moeforge/io/packed.hpp"

namespace moeforge::cli {

int run_export(int argc, char** argv) {
  args a("moeforge export",
         "Write a model as a Hugging Face directory (config.json + model.safetensors), a moeforge native directory, or a\n"
         "packed one: native, with the weight matrices stored as this build's kernel panels in the --dtype type, which\n"
         "moeforge maps in place instead of reading and packing them when it loads the directory.\n"
         "llama2.c's interleaved RoPE is reordered into Hugging Face's half-split form; models Hugging Face cannot\n"
         "express (CMoE routers, novices, unequal experts) are refused: export them as native. Native and packed\n"
         "outputs carry the model's tokenizer along (tokenizer.bin or tok512.bin in its directory, tok512.bin beside a file).");
  add_model_options(a, false);
  a.required("out", "DIR", "output directory (must not exist unless --force)");
  a.option("format", "hf|native|packed", "output format", "hf");
  a.option("dtype", "auto|f32|bf16", "with --format packed: the weight type of the panels (auto = the type the model runs in by default)", "auto");
  a.flag("force", "replace --out if it exists (only after the new model is complete)");
  if (!a.parse(argc, argv)) return 0;
  const std::string format = a.get("format");
  if (format != "hf" && format != "native" && format != "packed")
    throw usage_error("moeforge export: --format must be 'hf', 'native' or 'packed', got '" + format + "'");
  if (format != "packed" && a.get("dtype") != "auto") throw usage_error("moeforge export: --dtype applies to --format packed");
  io::check_output_dir(a.get("out"), a.flag_set("force"));
  io::native_save_options o;
  o.overwrite = a.flag_set("force");
  const nlohmann::json provenance{{"exported_from", a.get("model")}};
  // The model's tokenizer goes along into native and packed exports, as convert takes it into its output.
  if (const auto tokenizer = model_tokenizer(a.get("model"))) o.attachments.push_back({*tokenizer, "tokenizer.bin"});
  index_t layers = 0;
  if (format == "packed") {
    const auto tr = io::load_transformer(a.get("model"), load_options(a), requested_dtype(a));
    io::save_packed(tr, a.get("out"), provenance, o);
    layers = tr.config().n_layers;
  } else {
    const auto w = load_model(a);
    // A checkpoint mixing types keeps each tensor's, so its export runs as it does.
    if (format == "hf")
      io::save_hf(w, a.get("out"), {o.overwrite, true});
    else {
      o.as_source = true;
      io::save_native(w, a.get("out"), provenance, o);
    }
    layers = w.config.n_layers;
  }
  std::cout << "wrote " << a.get("out") << " (" << format << ", " << layers << " layers)\n";
  return 0;
}

}  // namespace moeforge::cli
