//! The C ABI called as C calls it: bad pointers, bad text, the panic guard, the header.

use super::*;
use std::ffi::CString;

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/petrel-tiny/petrel-tiny-w4a4.gguf");

fn last_error() -> String {
    // SAFETY: petrel_last_error returns a live NUL-terminated string.
    unsafe { CStr::from_ptr(petrel_last_error()) }.to_string_lossy().into_owned()
}

fn open_tiny() -> *mut petrel_model {
    let path = CString::new(TINY).expect("no NUL");
    // SAFETY: a NUL-terminated path and NULL params.
    let model = unsafe { petrel_model_open(path.as_ptr(), std::ptr::null()) };
    assert!(!model.is_null(), "{}", last_error());
    model
}

unsafe extern "C" fn collect(piece: *const c_char, len: usize, user: *mut c_void) -> bool {
    // SAFETY: the ABI passes `len` readable bytes and our own Vec as `user`.
    let (bytes, out) = unsafe { (std::slice::from_raw_parts(piece.cast::<u8>(), len), &mut *user.cast::<Vec<u8>>()) };
    // SAFETY: the piece is NUL-terminated after `len` bytes.
    assert_eq!(unsafe { *piece.add(len) }, 0);
    out.extend_from_slice(bytes);
    true
}

unsafe extern "C" fn stop_after_first(_: *const c_char, _: usize, user: *mut c_void) -> bool {
    // SAFETY: `user` is our own counter.
    unsafe { *user.cast::<u32>() += 1 };
    false
}

#[test]
fn null_pointers_and_invalid_utf8_are_errors_not_crashes() {
    // SAFETY: every call below passes NULL or valid pointers, as the contract allows.
    unsafe {
        assert!(petrel_model_open(std::ptr::null(), std::ptr::null()).is_null());
        assert_eq!(last_error(), "path is NULL");
        let bad = b"caf\xe9\0";
        assert!(petrel_model_open(bad.as_ptr().cast(), std::ptr::null()).is_null());
        assert!(last_error().contains("not valid UTF-8"), "{}", last_error());
        let missing = CString::new("/nonexistent/model.gguf").expect("no NUL");
        assert!(petrel_model_open(missing.as_ptr(), std::ptr::null()).is_null());
        assert!(last_error().contains("neither an existing file nor a known model"), "{}", last_error());
        assert!(petrel_session_new(std::ptr::null(), std::ptr::null()).is_null());
        assert_eq!(
            petrel_generate(std::ptr::null(), std::ptr::null(), std::ptr::null(), None, std::ptr::null_mut()),
            PETREL_ERR_INVALID_ARGUMENT
        );
        assert_eq!(petrel_session_cancel(std::ptr::null()), PETREL_ERR_INVALID_ARGUMENT);
        petrel_model_free(std::ptr::null_mut());
        petrel_session_free(std::ptr::null_mut());

        let model = open_tiny();
        let mut params = petrel_session_default_params();
        params.kv_type = 99;
        assert!(petrel_session_new(model, &params).is_null());
        assert!(last_error().contains("kv_type 99"));
        let session = petrel_session_new(model, &petrel_session_default_params());
        assert!(!session.is_null(), "{}", last_error());
        assert_eq!(
            petrel_generate(session, bad.as_ptr().cast(), std::ptr::null(), None, std::ptr::null_mut()),
            PETREL_ERR_INVALID_ARGUMENT
        );
        let messages = [petrel_chat_message { role: c"user".as_ptr(), content: std::ptr::null() }];
        assert_eq!(
            petrel_chat(session, messages.as_ptr(), 1, std::ptr::null(), None, std::ptr::null_mut()),
            PETREL_ERR_INVALID_ARGUMENT
        );
        assert_eq!(last_error(), "messages[0].content is NULL");
        let mut sampling = petrel_sampling_default_params();
        sampling.top_p = 2.0;
        assert_eq!(
            petrel_generate(session, c"Hi".as_ptr(), &sampling, None, std::ptr::null_mut()),
            PETREL_ERR_INVALID_ARGUMENT
        );
        let mut count = 0usize;
        assert_eq!(
            petrel_tokenize(model, c"hello world".as_ptr(), true, false, std::ptr::null_mut(), 0, &mut count),
            PETREL_ERR_BUFFER_TOO_SMALL
        );
        assert!(count > 0);
        let bad_ids = [u32::MAX];
        let mut length = 0usize;
        let mut text = [0 as c_char; 16];
        assert_eq!(
            petrel_detokenize(model, bad_ids.as_ptr(), 1, text.as_mut_ptr(), 16, &mut length),
            PETREL_ERR_INVALID_ARGUMENT
        );
        let missing_state = CString::new("/nonexistent/state.bin").expect("no NUL");
        assert_eq!(petrel_session_load(session, missing_state.as_ptr()), PETREL_ERR_IO);
        petrel_session_free(session);
        petrel_model_free(model);
    }
}

#[test]
fn a_panic_inside_a_call_is_reported_not_unwound() {
    let status = guard(|| panic!("boom"));
    assert_eq!(status, PETREL_ERR_INTERNAL);
    assert!(last_error().contains("boom"), "{}", last_error());
    let out: *mut u8 = guard_ptr(|| panic!("again"));
    assert!(out.is_null());
    assert!(last_error().contains("again"));
}

#[test]
fn generation_streams_stops_and_round_trips_through_tokens_and_saved_state() {
    // SAFETY: valid pointers throughout; the callbacks get our own user data.
    unsafe {
        let model = open_tiny();
        assert!(petrel_model_context_length(model) > 0);
        let session =
            petrel_session_new(model, &petrel_session_params { context: 256, threads: 1, kv_type: PETREL_KV_F32 });
        assert!(!session.is_null(), "{}", last_error());
        // The model may be freed before its sessions.
        petrel_model_free(model);
        let mut sampling = petrel_sampling_default_params();
        sampling.max_tokens = 12;
        let mut text: Vec<u8> = Vec::new();
        let status = petrel_generate(
            session,
            c"Once upon a time".as_ptr(),
            &sampling,
            Some(collect),
            (&mut text as *mut Vec<u8>).cast(),
        );
        assert_eq!(status, PETREL_OK, "{}", last_error());
        let mut summary = petrel_completion::default();
        assert_eq!(petrel_session_last_completion(session, &mut summary), PETREL_OK);
        assert!(summary.completion_tokens >= 1 && summary.prompt_tokens >= 4, "{summary:?}");
        assert!(std::str::from_utf8(&text).is_ok());

        // Stopping from the callback.
        let mut calls = 0u32;
        assert_eq!(petrel_session_reset(session), PETREL_OK);
        let status = petrel_generate(
            session,
            c"Once upon a time".as_ptr(),
            &sampling,
            Some(stop_after_first),
            (&mut calls as *mut u32).cast(),
        );
        assert_eq!((status, calls), (PETREL_OK, 1));
        assert_eq!(petrel_session_last_completion(session, &mut summary), PETREL_OK);
        assert_eq!(summary.stop_reason, PETREL_STOP_CANCELLED);

        // A cancel before the call stops the reply at its first token.
        assert_eq!(petrel_session_cancel(session), PETREL_OK);
        assert_eq!(petrel_generate(session, c" and".as_ptr(), &sampling, None, std::ptr::null_mut()), PETREL_OK);
        assert_eq!(petrel_session_last_completion(session, &mut summary), PETREL_OK);
        assert_eq!((summary.stop_reason, summary.completion_tokens), (PETREL_STOP_CANCELLED, 0));

        // Saved and restored, the conversation continues with the same tokens.
        let dir = tempfile::tempdir().expect("a temporary directory");
        let state = CString::new(dir.path().join("s.petrel").to_str().expect("UTF-8").as_bytes()).expect("no NUL");
        assert_eq!(petrel_session_reset(session), PETREL_OK);
        assert_eq!(petrel_generate(session, c"The cat".as_ptr(), &sampling, None, std::ptr::null_mut()), PETREL_OK);
        assert_eq!(petrel_session_save(session, state.as_ptr()), PETREL_OK, "{}", last_error());
        let (mut first, mut second) = (Vec::<u8>::new(), Vec::<u8>::new());
        petrel_generate(session, c" sat".as_ptr(), &sampling, Some(collect), (&mut first as *mut Vec<u8>).cast());
        assert_eq!(petrel_session_reset(session), PETREL_OK);
        assert_eq!(petrel_session_load(session, state.as_ptr()), PETREL_OK, "{}", last_error());
        petrel_generate(session, c" sat".as_ptr(), &sampling, Some(collect), (&mut second as *mut Vec<u8>).cast());
        assert_eq!(first, second);
        petrel_session_free(session);
    }
}

#[test]
fn tokenize_and_detokenize_round_trip() {
    // SAFETY: valid pointers and sizes throughout.
    unsafe {
        let model = open_tiny();
        let mut ids = [0u32; 64];
        let mut count = 0usize;
        assert_eq!(
            petrel_tokenize(model, c"hello world".as_ptr(), false, false, ids.as_mut_ptr(), 64, &mut count),
            PETREL_OK
        );
        let mut text = [0 as c_char; 64];
        let mut length = 0usize;
        assert_eq!(petrel_detokenize(model, ids.as_ptr(), count, text.as_mut_ptr(), 64, &mut length), PETREL_OK);
        assert_eq!(CStr::from_ptr(text.as_ptr()).to_str(), Ok("hello world"));
        assert_eq!(length, 11);
        assert_eq!(
            petrel_detokenize(model, ids.as_ptr(), count, text.as_mut_ptr(), 11, &mut length),
            PETREL_ERR_BUFFER_TOO_SMALL
        );
        petrel_model_free(model);
    }
}

fn generated_header() -> String {
    let crate_dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{crate_dir}/cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen runs")
        .write(&mut out);
    String::from_utf8(out).expect("UTF-8")
}

#[test]
fn committed_header_is_current() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/petrel.h"))
        .expect("the committed header");
    assert!(
        committed == generated_header(),
        "include/petrel.h is stale: regenerate it with `cargo test -p petrel-c -- --ignored regenerate_header`"
    );
}

#[test]
#[ignore = "writes include/petrel.h"]
fn regenerate_header() {
    std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/include/petrel.h"), generated_header())
        .expect("writes the header");
}
