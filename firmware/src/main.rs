//! Petrel-tiny on a Cortex-M: the W4A4 model in flash, read in place by the runtime's GGUF
//! reader; a fixed prompt, greedy decoding, the text and token ids logged to the host.
//!
//! The prompt is run once per kernel set this core has (scalar reference, DSP, and on the
//! Cortex-M55 build Helium), each from a fresh session, with SysTick counting instructions
//! (see `counter`). Every set must produce the same tokens; the host checks them against
//! the desktop runtime (`scripts/firmware_check.py`). Any error ends with a message and
//! exit code 1, as do a panic and a HardFault.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use cortex_m_rt::entry;
use cortex_m_semihosting::debug::{exit, EXIT_SUCCESS};
use petrel_quant::dot::Isa;
use petrel_runtime::{GgufFile, Kernels, KvType, Model, Sampler, SamplerConfig, Session, SessionOptions};

use petrel_firmware::counter::Counter;
use petrel_firmware::{fail, memory, say};

/// The prompt, as raw text (no chat template), as `petrel run --raw` takes it.
#[cfg(not(feature = "fault-long-prompt"))]
const PROMPT: &str = "The king said";
/// The fault drill: a prompt longer than the KV cache.
#[cfg(feature = "fault-long-prompt")]
const PROMPT: &str = "The king said unto his servants, go ye into the city and tell the people that the \
    queen is come, and that the feast is ready, for the day is at hand and the harvest is great, and \
    the labourers are few; and they went out and told all the people of the land.";
/// Tokens generated after the prompt.
const NEW_TOKENS: usize = 32;
/// KV-cache positions (prompt + generated): 3 KiB each for Petrel-tiny.
const CAPACITY: usize = 36;
/// Prompt tokens per prefill batch (bounds the scratch buffers).
const MAX_BATCH: usize = 4;

const MODEL_BYTES: usize = include_bytes!(concat!(env!("OUT_DIR"), "/model.gguf")).len();

/// The model's bytes, 32-byte aligned (as GGUF aligns tensors within the file), in the
/// `.model` section that the linker script places in flash.
#[repr(C, align(32))]
struct Aligned<T>(T);

#[link_section = ".model"]
static MODEL: Aligned<[u8; MODEL_BYTES]> = Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/model.gguf")));

#[entry]
fn main() -> ! {
    memory::HEAP.init();
    memory::paint_stack();
    let Some(peripherals) = cortex_m::Peripherals::take() else { fail("core peripherals already taken") };
    let counter = Counter::start(peripherals.SYST);
    match run(&counter) {
        Ok(()) => {
            say!("done: exit 0");
            exit(EXIT_SUCCESS);
        }
        Err(message) => fail(&message),
    }
    loop {
        cortex_m::asm::bkpt();
    }
}

/// One kernel set's run: the tokens and the instruction counts.
struct Generation {
    tokens: Vec<u32>,
    prefill_instructions: u64,
    decode_instructions: u64,
}

fn run(counter: &Counter) -> Result<(), String> {
    say!(
        "petrel-firmware: model {} bytes in flash at {}",
        MODEL_BYTES,
        format!("{:#010x}", MODEL.0.as_ptr() as usize).as_str()
    );
    say!(
        "calibration: {} instructions per 1000 SysTick ticks ({} ticks)",
        counter.milli_instructions_per_tick(),
        counter.calibration_ticks()
    );
    let heap_before = memory::HEAP.in_use();
    let file = GgufFile::parse(&MODEL.0).map_err(|e| format!("the model in flash is not a valid GGUF file: {e}"))?;
    let model = Model::load(&file).map_err(|e| format!("the model cannot be loaded: {e}"))?;
    let prompt = model.tokenizer.encode(PROMPT, false);
    say!(
        "model: {} blocks, d = {}, vocab {}; loaded with {} heap bytes",
        model.config.layers,
        model.config.dim,
        model.config.vocab_size,
        memory::HEAP.in_use() - heap_before
    );
    say!("prompt: {} ({} tokens)", PROMPT, prompt.len());
    say!("prompt ids: {}", ids(&prompt).as_str());

    let mut reference: Option<Vec<u32>> = None;
    for &isa in Isa::ALL.iter() {
        let Some(kernels) = Kernels::for_isa(isa) else {
            say!("kernels {}: not supported by this core, skipped", isa.name());
            continue;
        };
        let generation = generate(&model, &prompt, kernels, counter)?;
        let decoded = generation.tokens.len().saturating_sub(1).max(1) as u64;
        say!(
            "kernels {}: prefill {} instructions ({} tokens), decode {} instructions per token ({} tokens)",
            isa.name(),
            generation.prefill_instructions,
            prompt.len(),
            generation.decode_instructions / decoded,
            generation.tokens.len()
        );
        match &reference {
            None => {
                say!("generated ids: {}", ids(&generation.tokens).as_str());
                say!("text: {}", model.tokenizer.decode(&generation.tokens).as_str());
                reference = Some(generation.tokens);
            }
            Some(first) if *first == generation.tokens => say!("kernels {}: same tokens as the reference", isa.name()),
            Some(_) => {
                return Err(format!(
                    "kernels {} generated {} instead of the reference's tokens",
                    isa.name(),
                    ids(&generation.tokens)
                ));
            }
        }
    }
    say!(
        "memory: heap peak {} of {} bytes, stack high-water {} of {} bytes",
        memory::HEAP.peak(),
        memory::HEAP_BYTES,
        memory::stack_high_water(),
        memory::stack_room()
    );
    if memory::stack_high_water() + 64 >= memory::stack_room() {
        return Err(String::from(
            "the stack reached the static data: it may have overflowed (shrink memory::HEAP_BYTES)",
        ));
    }
    Ok(())
}

/// Greedy generation of up to [`NEW_TOKENS`] from a fresh session with `kernels`. Fails if
/// the decode loop allocated.
fn generate(model: &Model<'_>, prompt: &[u32], kernels: Kernels, counter: &Counter) -> Result<Generation, String> {
    let options = SessionOptions {
        capacity: CAPACITY,
        max_batch: MAX_BATCH,
        threads: 1,
        kernels: Some(kernels),
        // f32: the tiny model's cache is a few KiB, and the M4F has no half-precision
        // conversion instructions (the host check runs `--kv-type f32` to match).
        kv_type: KvType::F32,
        ..SessionOptions::default()
    };
    let mut session = Session::new(model, options).map_err(|e| format!("no session: {e}"))?;
    let mut sampler = Sampler::new(
        SamplerConfig { temperature: 0.0, repetition_penalty: 1.0, ..SamplerConfig::default() },
        model.config.vocab_size,
    );
    let mut tokens = Vec::with_capacity(NEW_TOKENS);
    let start = counter.ticks();
    let logits = session.prefill(prompt).map_err(|e| format!("the prompt does not run: {e}"))?;
    let mut token = sampler.sample(logits);
    let prefill_instructions = counter.instructions(counter.ticks() - start);
    let mut decode_ticks = 0;
    let allocations = memory::HEAP.allocations();
    // Stops as the desktop runtime's `Session::generate` does: an end-of-generation token is
    // not part of the reply.
    while !model.tokenizer.is_end_of_generation(token) {
        tokens.push(token);
        if tokens.len() == NEW_TOKENS || session.position() == session.capacity() {
            break;
        }
        let start = counter.ticks();
        let logits = session.step(token).map_err(|e| format!("decoding failed: {e}"))?;
        token = sampler.sample(logits);
        decode_ticks += counter.ticks() - start;
    }
    if memory::HEAP.allocations() != allocations {
        return Err(format!("the decode loop allocated {} times", memory::HEAP.allocations() - allocations));
    }
    Ok(Generation { tokens, prefill_instructions, decode_instructions: counter.instructions(decode_ticks) })
}

/// Token ids as one space-separated line.
fn ids(tokens: &[u32]) -> String {
    let mut line = String::new();
    for (i, t) in tokens.iter().enumerate() {
        let _ = write!(line, "{}{t}", if i == 0 { "" } else { " " });
    }
    line
}
